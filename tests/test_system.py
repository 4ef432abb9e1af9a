"""End to end on a local Ray cluster: real learners (DeepSpeed ZeRO over gloo), the hf
generator, scorers, weight sync and the run directory, on a tiny random-init model."""

from __future__ import annotations

import json
import math
import random

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sera_ray.cluster import InsufficientResourcesError, launch_roles
from sera_ray.config import load_config
from sera_ray.data import schema as S
from sera_ray.driver import run_sera
from sera_ray.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def roles(ray_cluster, tmp_path_factory, tiny_model_dir, pairs_file):
    """One set of actors serves every run of this module, as in the demo and the benchmark:
    a reference generator for mixed candidates, and policy scorers that keep the previous
    policy for the iteration ensemble."""
    config = small_config(
        tmp_path_factory.mktemp("roles"), tiny_model_dir, pairs_file, "sera.ensemble_lambda=0.5"
    )
    roles = launch_roles(config, reference_generator=True)
    yield roles
    roles.shutdown()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with path.open("w") as out:
        for i in range(48):
            digits = "".join(rng.choice("0123456789") for _ in range(4))
            row = {
                "prompt": f"Sort {digits}:",
                "chosen": " " + "".join(sorted(digits)),
                "rejected": " " + digits[::-1] + "!" * (1 + i % 3),
                "is_noisy": i % 5 == 0,
            }
            out.write(json.dumps(row) + "\n")
    return path


def small_config(tmp_path, model_dir, pairs_file, *overrides):
    return load_config(
        None,
        [
            f"model.policy={model_dir}",
            f"data.train={pairs_file}",
            f"run.output_dir={tmp_path}",
            "run.name=e2e",
            "sera.iterations=2",
            "generation.backend=hf",
            "generation.max_new_tokens=8",
            "bootstrap.num_samples=4",
            "bootstrap.drop_truncated=false",
            "trainer.micro_batch_size=8",
            "trainer.learning_rate=1e-3",
            "trainer.num_learners=2",
            "scoring.rows_per_block=24",
            *overrides,
        ],
    )


def test_two_iterations_train_sync_and_bootstrap(roles, tmp_path, tiny_model_dir, pairs_file):
    config = small_config(
        tmp_path, tiny_model_dir, pairs_file, "trainer.zero_stage=2", "sync.transport=collective"
    )

    summary = run_sera(config, roles)

    run = tmp_path / "e2e"
    # The policy changed.
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "iter_2" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    reloaded = AutoModelForCausalLM.from_pretrained(run / "iter_2" / "checkpoint")
    assert torch.equal(reloaded.lm_head.weight, after["lm_head.weight"])
    # Every sync made generator and scorer agree with the learner: probes and checksums.
    assert summary.weight_sync_verified and summary.syncs == 2
    syncs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("stage") == "sync"]
    assert len(syncs) == 2
    assert all(r["sync/probe_max_diff"] <= 1e-5 for r in syncs)
    assert all(r["sync/checksums_compared"] == 2 for r in syncs)  # hf generator + policy scorer
    # Bootstrapped pairs exist on disk with the schema of offline pairs.
    bootstrap = pq.read_table(run / "iter_2" / "bootstrap.parquet")
    assert bootstrap.num_rows > 0
    for field in S.TOKENIZED_SCHEMA:
        assert bootstrap.schema.field(field.name).type == field.type
    assert set(bootstrap.column(S.SOURCE).to_pylist()) == {"bootstrap"}
    # Selection wrote margins and the kept flag; the first iteration kept every pair.
    first = pq.read_table(run / "iter_1" / "selected.parquet")
    second = pq.read_table(run / "iter_2" / "selected.parquet")
    assert all(first.column(S.KEPT).to_pylist())
    assert sum(second.column(S.KEPT).to_pylist()) == math.ceil(0.7 * 48)
    assert "is_noisy" in second.column_names  # passthrough columns survive every stage
    # Losses are finite.
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "stage" not in r]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    assert json.loads((run / "state.json").read_text())["completed"][-1] == "iter_2"


def test_zero3_with_object_store_sync_and_ensemble(roles, tmp_path, tiny_model_dir, pairs_file):
    config = small_config(
        tmp_path,
        tiny_model_dir,
        pairs_file,
        "trainer.zero_stage=3",
        "sync.transport=object_store",
        "sera.ensemble_lambda=0.5",
        "bootstrap.candidates=mixed",
    )

    summary = run_sera(config, roles)

    assert summary.weight_sync_verified
    syncs = [
        r for r in read_metrics(tmp_path / "e2e" / "metrics.jsonl") if r.get("stage") == "sync"
    ]
    assert len(syncs) == 2 and all(r["sync/verified"] for r in syncs)
    bootstrap = pq.read_table(tmp_path / "e2e" / "iter_2" / "bootstrap.parquet")
    sources = set(bootstrap.column("chosen_candidate_source").to_pylist())
    sources |= set(bootstrap.column("rejected_candidate_source").to_pylist())
    assert sources <= {"policy", "reference"} and bootstrap.num_rows > 0
    selected = pq.read_table(tmp_path / "e2e" / "iter_2" / "selected.parquet")
    assert S.PREVIOUS_CHOSEN_LOGP in selected.column_names


def test_a_run_resumes_after_its_last_complete_iteration(
    roles, tmp_path, tiny_model_dir, pairs_file
):
    config = small_config(tmp_path, tiny_model_dir, pairs_file, "sera.iterations=1")
    run_sera(config, roles)
    longer = small_config(tmp_path, tiny_model_dir, pairs_file, "sera.iterations=2")

    summary = run_sera(longer, roles)

    assert [record["iteration"] for record in summary.iterations] == [2]
    assert "data" not in summary.stage_seconds  # reused from the first run
    assert (tmp_path / "e2e" / "iter_2" / "checkpoint" / "model.safetensors").exists()


def test_roles_that_cannot_be_placed_fail_fast_naming_the_role(
    ray_cluster, tmp_path, tiny_model_dir, pairs_file
):
    config = small_config(
        tmp_path,
        tiny_model_dir,
        pairs_file,
        "resources.learner.num_cpus=64",
        "cluster.resource_wait_seconds=2",
    )

    with pytest.raises(InsufficientResourcesError) as error:
        launch_roles(config)

    message = str(error.value)
    assert "learner: 2 x {'CPU': 64.0}" in message
    assert "missing: CPU" in message
