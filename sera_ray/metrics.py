"""Metrics: one JSON line per step and per stage, mirrored to TensorBoard and Prometheus.

The names are the same everywhere (`rewards/margins`, `sync/seconds`, ...); Prometheus gets
them with `/` replaced by `_` and a `sera_` prefix, as its naming rules require, and Ray's
metrics agent adds its own `ray_` in front (`ray_sera_sync_seconds`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def prometheus_name(name: str) -> str:
    return "sera_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class MetricsLogger:
    """Appends records to metrics.jsonl; numeric fields also go to TensorBoard and Prometheus.

    TensorBoard is used when the `tensorboard` package is installed; Prometheus gauges are
    exported through Ray's metrics agent when Ray is initialised.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                logger.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
        self._gauges: dict[str, Any] = {}

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as out:
            out.write(json.dumps(record, default=float) + "\n")
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in ("time", "step") or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            if self._writer is not None:
                self._writer.add_scalar(key, value, step)
            self._set_gauge(key, float(value), record.get("stage"))

    def _set_gauge(self, key: str, value: float, stage: str | None) -> None:
        try:
            import ray
            from ray.util.metrics import Gauge
        except ImportError:
            return
        if not ray.is_initialized():
            return
        name = prometheus_name(key)
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, description=key, tag_keys=("stage",))
        self._gauges[name].set(value, tags={"stage": stage or "train"})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
