"""A checksum of weights: equal for identical tensors under identical names, dtypes and shapes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order, whatever its dtype (bfloat16 included)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class WeightsChecksum:
    """Accumulates a checksum one tensor at a time, so a stream can be checked as it passes.

    Each tensor is hashed on arrival (name, dtype, shape, bytes); the final digest is a sha256
    over those per-tensor digests in sorted name order, so the arrival order does not matter and
    no tensor has to be kept.
    """

    def __init__(self) -> None:
        self._digests: dict[str, str] = {}

    def update(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._digests:
            raise ValueError(f"tensor {name!r} appears twice in the weights")
        digest = hashlib.sha256()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor_bytes(tensor))
        self._digests[name] = digest.hexdigest()

    def passing(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors unchanged, hashing each on its way through."""
        for name, tensor in named_tensors:
            self.update(name, tensor)
            yield name, tensor

    @property
    def num_tensors(self) -> int:
        return len(self._digests)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in sorted(self._digests):
            total.update(f"{name}\0{self._digests[name]}\n".encode())
        return total.hexdigest()


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    checksum = WeightsChecksum()
    for name, tensor in named_tensors:
        checksum.update(name, tensor)
    return checksum.hexdigest()
