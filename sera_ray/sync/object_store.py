"""The object-store transport: one safetensors blob, put once, read by every receiver.

Needs nothing but Ray, so it works between any two processes of a cluster, GPU or not. The
driver passes the blob's ObjectRef to each receiver as a top-level task argument, so Ray hands
the receiver the bytes themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sera_ray.sync.base import SentWeights, WeightTransport, register_transport
from sera_ray.sync.checksum import WeightsChecksum

logger = logging.getLogger(__name__)


def pack_blob(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Serialize named tensors into one safetensors blob (CPU copies, in the given order)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in named_tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied embeddings): give those their own.
        storage = cpu.untyped_storage().data_ptr()
        if storage in seen_storage:
            cpu = cpu.clone()
        seen_storage.add(cpu.untyped_storage().data_ptr())
        tensors[name] = cpu
    return save(tensors)


def unpack_blob(blob: bytes) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors blob, on CPU, in the order they were packed."""
    from safetensors.torch import load

    return load(blob)


@register_transport
class ObjectStoreTransport(WeightTransport):
    """Moves weights as one safetensors blob through the Ray object store."""

    name = "object_store"
    concurrent = False

    # Limitation: the sender holds the whole model twice (its tensors and the blob) and every
    # receiver holds the blob and the unpacked tensors at once; for models near a node's memory,
    # use the collective transport, which moves one bucket at a time.
    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SentWeights:
        """1. pack the tensors into one blob (hashing each), 2. `ray.put` the blob."""
        import ray

        start = time.perf_counter()
        checksum = WeightsChecksum()
        blob = pack_blob(checksum.passing(named_tensors))
        ref = ray.put(blob)
        sent = SentWeights(
            payload=ref,
            num_bytes=len(blob),
            num_tensors=checksum.num_tensors,
            checksum=checksum.hexdigest(),
            seconds=time.perf_counter() - start,
        )
        logger.info(
            "object store: put %d tensors, %d bytes in %.3f s",
            sent.num_tensors,
            sent.num_bytes,
            sent.seconds,
        )
        return sent

    def receive_weights(self, payload: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Unpack the blob; `payload` is its bytes, or its ObjectRef when it arrived nested."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            import ray

            payload = ray.get(payload)
        yield from unpack_blob(bytes(payload)).items()
