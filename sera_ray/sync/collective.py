"""The collective transport: learner rank 0 broadcasts the weights to every receiver.

```
                                 +--> receiver 1 (group rank 1): a generator or policy scorer
  learner rank 0 (group rank 0) -+--> ...
                                 +--> receiver k (group rank k)
```

The weight group is its own process group, built from a TCPStore and a Gloo (CPU) or NCCL (GPU)
process-group object directly. It never touches torch.distributed's default group, which a
learner process already holds for its DeepSpeed ranks.

Per bucket the sender broadcasts a header (JSON: names, dtypes, shapes, whether it is the last
bucket) as a length and then its bytes, and then one flat buffer per dtype. A bucket holds
tensors up to `bucket_mb`; a tensor larger than that travels alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sera_ray.sync.base import SentWeights, WeightTransport, register_transport
from sera_ray.sync.checksum import WeightsChecksum

logger = logging.getLogger(__name__)

SENDER_RANK = 0
_STORE_PREFIX = "sera_ray/weights"


def free_port() -> int:
    """A TCP port free on this host now, for the weight group's store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@dataclass
class WeightGroup:
    """One member's handle on the weight group."""

    process_group: Any
    store: Any
    rank: int
    world_size: int
    device: torch.device


def init_group(
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> WeightGroup:
    """Join the weight group; every rank calls this at the same time (rank 0 hosts the store).

    1. connect to the TCPStore at master_addr:master_port (rank 0 creates it),
    2. build the Gloo or NCCL process group on a prefix of that store.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_addr,
        master_port,
        world_size,
        is_master=rank == SENDER_RANK,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefix_store = dist.PrefixStore(_STORE_PREFIX, store)

    if backend == "gloo":
        process_group = dist.ProcessGroupGloo(prefix_store, rank, world_size, timeout)
        device = torch.device("cpu")
    elif backend == "nccl":
        # Limitation: the NCCL path is the Gloo path with CUDA tensors and has not run on the
        # CPU-only machines this package is tested on.
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        process_group = dist.ProcessGroupNCCL(prefix_store, rank, world_size, options)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"unknown weight group backend {backend!r}; choose gloo or nccl")

    logger.info(
        "joined weight group at %s:%d as rank %d of %d (%s)",
        master_addr,
        master_port,
        rank,
        world_size,
        backend,
    )
    return WeightGroup(process_group, store, rank, world_size, device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight bucket header")
    return dtype


@register_transport
class CollectiveTransport(WeightTransport):
    """Broadcasts weights in buckets over a Gloo or NCCL weight group."""

    name = "collective"
    concurrent = True

    def __init__(self, bucket_mb: float = 32.0, checksum: bool = True):
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.checksum = checksum
        self.group: WeightGroup | None = None

    def init_group(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
    ) -> None:
        """Join the weight group: rank 0 is the sender, ranks 1..world_size-1 the receivers."""
        self.group = init_group(master_addr, master_port, rank, world_size, backend, timeout_s)

    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SentWeights:
        """Broadcast the tensors, reading the iterator one bucket ahead at most.

        1. copy tensors into the current bucket until the next would overflow it,
        2. broadcast the bucket's header, then its flat buffer per dtype,
        3. repeat; the last bucket's header says it is the last.

        Each tensor is copied as it arrives, so an iterator that gathers one ZeRO-3 parameter at
        a time may release it as soon as it advances.
        """
        # Limitation: if the sender fails between buckets, the receivers learn of it only when
        # their broadcast times out (`timeout_s` of init_group); nothing aborts them sooner.
        group = self._member(sender=True)
        start = time.perf_counter()
        checksum = WeightsChecksum()
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = num_bytes = num_tensors = num_buckets = 0

        for name, tensor in named_tensors:
            if bucket and bucket_bytes + tensor.numel() * tensor.element_size() > self.bucket_bytes:
                self._broadcast_bucket(group, bucket, last=False)
                num_buckets += 1
                bucket, bucket_bytes = [], 0
            flat = torch.empty(tensor.numel(), dtype=tensor.dtype, device=group.device)
            flat.copy_(tensor.detach().reshape(-1))
            bucket.append((name, flat.view(tensor.shape)))
            bucket_bytes += flat.numel() * flat.element_size()
            num_bytes += flat.numel() * flat.element_size()
            num_tensors += 1
            # Limitation: hashing copies each tensor to host memory, which on GPUs costs a
            # device-to-host transfer of the whole model; `checksum=False` skips it.
            if self.checksum:
                checksum.update(name, flat.view(tensor.shape))

        self._broadcast_bucket(group, bucket, last=True)
        num_buckets += 1

        sent = SentWeights(
            payload=None,
            num_bytes=num_bytes,
            num_tensors=num_tensors,
            checksum=checksum.hexdigest() if self.checksum else "",
            seconds=time.perf_counter() - start,
            num_buckets=num_buckets,
        )
        logger.info(
            "collective: broadcast %d tensors, %d bytes in %d buckets to %d receivers in %.3f s",
            sent.num_tensors,
            sent.num_bytes,
            sent.num_buckets,
            group.world_size - 1,
            sent.seconds,
        )
        return sent

    def receive_weights(self, payload: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the broadcast tensors bucket by bucket; `payload` is unused (None)."""
        group = self._member(sender=False)
        while True:
            header = json.loads(self._broadcast_bytes(group, None).decode())
            buffers = {}
            for dtype_name in header["dtypes"]:
                numel = sum(
                    math.prod(shape)
                    for _, tensor_dtype, shape in header["tensors"]
                    if tensor_dtype == dtype_name
                )
                buffer = torch.empty(numel, dtype=_dtype(dtype_name), device=group.device)
                self._broadcast(group, buffer)
                buffers[dtype_name] = buffer

            offsets = dict.fromkeys(buffers, 0)
            for tensor_name, dtype_name, shape in header["tensors"]:
                numel = math.prod(shape)
                offset = offsets[dtype_name]
                yield tensor_name, buffers[dtype_name][offset : offset + numel].view(shape)
                offsets[dtype_name] = offset + numel
            logger.debug("collective: received a bucket of %d tensors", len(header["tensors"]))
            if header["last"]:
                return

    def close(self) -> None:
        """Leave the weight group."""
        if self.group is not None:
            if hasattr(self.group.process_group, "shutdown"):
                self.group.process_group.shutdown()
            self.group = None

    def _member(self, *, sender: bool) -> WeightGroup:
        if self.group is None:
            raise RuntimeError("join the weight group with init_group() before a sync")
        if sender != (self.group.rank == SENDER_RANK):
            role = "sends" if sender else "receives"
            raise RuntimeError(f"rank {self.group.rank} of the weight group never {role}")
        return self.group

    def _broadcast_bucket(
        self, group: WeightGroup, bucket: list[tuple[str, torch.Tensor]], *, last: bool
    ) -> None:
        dtypes = list(dict.fromkeys(_dtype_name(tensor.dtype) for _, tensor in bucket))
        header = {
            "tensors": [
                [name, _dtype_name(tensor.dtype), list(tensor.shape)] for name, tensor in bucket
            ],
            "dtypes": dtypes,
            "last": last,
        }
        self._broadcast_bytes(group, json.dumps(header).encode())
        for dtype_name in dtypes:
            parts = [t.reshape(-1) for _, t in bucket if _dtype_name(t.dtype) == dtype_name]
            self._broadcast(group, torch.cat(parts))

    def _broadcast_bytes(self, group: WeightGroup, data: bytes | None) -> bytes:
        """Broadcast a byte string from the sender: its length first, then its bytes."""
        length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        length = self._broadcast(group, length.to(group.device))
        if data is not None:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(group.device)
        else:
            buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
        return self._broadcast(group, buffer).cpu().numpy().tobytes()

    @staticmethod
    def _broadcast(group: WeightGroup, tensor: torch.Tensor) -> torch.Tensor:
        options = dist.BroadcastOptions()
        options.rootRank = SENDER_RANK
        group.process_group.broadcast([tensor], options).wait()
        return tensor
