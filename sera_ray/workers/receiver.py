"""The receiving side of a weight sync, shared by generator and scorer workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from sera_ray.sync.base import make_transport

logger = logging.getLogger(__name__)


class WeightReceiver:
    """Mixin: joins the sync transport and loads what it receives through `_load_weights`."""

    receiver_name: str = "receiver"

    def join_weight_sync(
        self,
        transport: str,
        options: dict[str, Any],
        group: dict[str, Any] | None = None,
    ) -> None:
        """Set up the transport; a collective one also joins its group (rank >= 1)."""
        self._transport = make_transport(transport, **options)
        if group is not None:
            self._transport.init_group(**group)

    def receive_weights(self, payload: Any = None) -> dict[str, float]:
        """Receive one sync and load it; returns the seconds it took."""
        start = time.perf_counter()
        self._load_weights(self._transport.receive_weights(payload))
        seconds = time.perf_counter() - start
        logger.debug("%s loaded synced weights in %.2fs", self.receiver_name, seconds)
        return {"seconds": seconds}

    def _load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError
