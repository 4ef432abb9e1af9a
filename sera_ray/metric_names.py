"""The metric names a SeRA run emits, in one list that the dashboards and their tests read.

A name is a key of metrics.jsonl and a TensorBoard tag. In Prometheus it becomes a gauge named
by `sera_ray.metrics.prometheus_name` (`sera_` + the name with every character outside
[a-zA-Z0-9_] replaced by `_`), which Ray's metrics agent exports with its own `ray_` prefix
and a `stage` label: `sync/seconds` is scraped as `ray_sera_sync_seconds{stage="sync"}`.
"""

from __future__ import annotations

# One record per optimizer step, averaged over every learner rank; labelled stage="train".
STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "lr",
    "time/data_seconds",
    "time/compute_seconds",
)

# The record of each weight sync (learner rank 0 to every policy receiver); stage="sync".
SYNC_METRICS = (
    "sync/seconds",
    "sync/bytes",
    "sync/tensors",
    "sync/receivers",
    "sync/probe_max_diff",
    "sync/checksums_compared",
)

# Every stage record carries its wall-clock seconds, labelled with the stage's name.
STAGE_METRICS = ("seconds",)

# The stages of the driver, as the `stage` label spells them. "reuse_data" replaces "data" and
# "reference_scores" when a run copies another run's prepared pairs (data.reuse_from); "eval"
# runs only where a caller (the toy demo, the benchmark) evaluates each iteration's policy.
STAGES = (
    "data",
    "reuse_data",
    "reference_scores",
    "select",
    "bootstrap",
    "train",
    "sync",
    "checkpoint",
    "eval",
)

# Limitation: the per-stage counts (pairs, kept, prompts_sampled, ...) are exported as gauges
# too but are not listed here; a dashboard that plots one has to add it to this module first.
EMITTED = STEP_METRICS + SYNC_METRICS + STAGE_METRICS

STAGE_LABEL = "stage"
RAY_EXPORT_PREFIX = "ray_"  # what Ray's metrics agent puts before every application metric
