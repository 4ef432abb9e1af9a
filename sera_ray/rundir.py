"""The run directory: resolved config, per-iteration Parquet files, checkpoints, metrics, state.

runs/<name>/
  config.yaml                  resolved config, as run
  offline.parquet              offline pairs, tokenized, with reference log-probs
  bootstrap_prompts.parquet    prompts for bootstrapping, tokenized
  iter_<t>/selected.parquet    offline pairs with margins and a kept flag
  iter_<t>/bootstrap.parquet   bootstrapped pairs with rewards and margins
  iter_<t>/checkpoint/         the policy after iteration t (HF format, safetensors)
  metrics.jsonl                one line per step and per stage
  state.json                   which stages are complete (for resume)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def offline_path(self) -> Path:
        return self.root / "offline.parquet"

    @property
    def prompts_path(self) -> Path:
        return self.root / "bootstrap_prompts.parquet"

    def iteration_dir(self, iteration: int) -> Path:
        path = self.root / f"iter_{iteration}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def selected_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "selected.parquet"

    def bootstrap_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "bootstrap.parquet"

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "checkpoint"

    # State: the names of the stages that are complete, in order.

    def completed(self) -> list[str]:
        if not self.state_path.exists():
            return []
        return json.loads(self.state_path.read_text())["completed"]

    def is_complete(self, stage: str) -> bool:
        return stage in self.completed()

    def mark_complete(self, stage: str) -> None:
        done = self.completed()
        if stage not in done:
            done.append(stage)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"completed": done}, indent=1))
        tmp.replace(self.state_path)

    def reset_state(self) -> None:
        self.state_path.unlink(missing_ok=True)


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write one Parquet file atomically (a reader never sees half a stage's output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)
