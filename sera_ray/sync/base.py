"""The weight-sync interface: a transport moves the learner's weights to generators and scorers.

The learner's rank 0 calls `send_weights` on an iterator of (Hugging Face name, tensor); every
receiver calls `receive_weights` with the payload the driver hands it and loads what it yields.
Transports are chosen by name from a registry, so configuration picks one and code stays the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


class WeightSyncError(RuntimeError):
    """A receiver failed to take the weights, or does not agree with the sender afterwards."""

    def __init__(self, receiver: str, detail: str):
        super().__init__(f"weight sync to {receiver} failed: {detail}")
        self.receiver = receiver
        self.detail = detail


@dataclass(frozen=True)
class SentWeights:
    """What one `send_weights` call moved, and what the driver hands to the receivers.

    `payload` is picklable: a Ray ObjectRef of the blob for the object store, None for the
    collective transport (its receivers take the weights from the group, not from the driver).
    `checksum` is `weights_checksum` of what was sent; `num_buckets` counts the pieces it took.
    """

    payload: Any
    num_bytes: int
    num_tensors: int
    checksum: str
    seconds: float
    num_buckets: int = 1


class WeightTransport(ABC):
    """Sends named tensors from one sender to many receivers."""

    name: str = ""
    # True when sender and receivers must run at the same time (a collective): the driver then
    # starts every receiver's `receive_weights` before it waits on the sender's `send_weights`.
    concurrent: bool = False

    @abstractmethod
    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SentWeights:
        """Sender side: move these tensors and say what was moved."""

    @abstractmethod
    def receive_weights(self, payload: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side: yield the sent tensors, in the order they were sent."""

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release what the transport holds (a process group, for instance)."""


_TRANSPORTS: dict[str, type[WeightTransport]] = {}


def register_transport(cls: type[WeightTransport]) -> type[WeightTransport]:
    """Class decorator: make a transport available to `make_transport` under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name` to be registered")
    if cls.name in _TRANSPORTS and _TRANSPORTS[cls.name] is not cls:
        raise ValueError(f"weight transport {cls.name!r} is already registered")
    _TRANSPORTS[cls.name] = cls
    return cls


def available_transports() -> list[str]:
    return sorted(_TRANSPORTS)


def make_transport(name: str, **options: Any) -> WeightTransport:
    """Build the transport registered under `name`, passing `options` to its constructor."""
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; choose from {available_transports()}")
    factory: Callable[..., WeightTransport] = _TRANSPORTS[name]
    return factory(**options)
