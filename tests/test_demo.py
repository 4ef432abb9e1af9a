"""A short version of `sera-ray demo`: the toy world end to end through the real actor system."""

from __future__ import annotations

import json

import pytest

from sera_ray.toy.demo import format_table, run_demo

pytestmark = pytest.mark.slow

METHOD_KEYS = {"gold_reward", "win_rate_vs_sft", "spurious_rate", "mean_length"}
ITERATION_KEYS = {
    "selected",
    "dropped",
    "bootstrapped",
    "noisy_dropped_fraction",
    "spurious_dropped_fraction",
    "clean_dropped_fraction",
    "bootstrap_gold_accuracy",
    "gold_reward",
}


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out=out, small=True, overrides=["sera.iterations=2"])
    ray.shutdown()
    return out, report


def test_report_has_every_method_iteration_and_stage(demo_report):
    out, report = demo_report

    written = json.loads((out / "report.json").read_text())

    assert set(written["methods"]) == {"sft", "dpo", "sera", "sera_ref"}
    for metrics in written["methods"].values():
        assert METHOD_KEYS <= set(metrics)
    assert written["iterations"] == written["iterations_by_method"]["sera"]
    for method in ("sera", "sera_ref"):
        assert [e["iteration"] for e in written["iterations_by_method"][method]] == [1, 2]
        for entry in written["iterations_by_method"][method]:
            assert ITERATION_KEYS <= set(entry)
    assert written["stage_seconds"]["world"] > 0
    assert written["config"]["trainer"]["loss"] == "dpo"
    assert (out / "report.png").stat().st_size > 10_000
    assert "SeRA-DPO" in format_table(report)


def test_every_weight_sync_was_verified(demo_report):
    _, report = demo_report

    assert report["weight_sync_verified"] is True


def test_sft_warm_up_raised_gold_reward_over_the_random_model(demo_report):
    _, report = demo_report

    assert report["methods"]["sft"]["gold_reward"] > report["world"]["random"]["gold_reward"] + 0.2


def test_selection_dropped_more_of_the_noisy_pairs_than_of_the_clean(demo_report):
    _, report = demo_report

    second = report["iterations"][1]

    assert second["dropped"] > 0 and second["bootstrapped"] > 0
    assert second["noisy_dropped_fraction"] > second["clean_dropped_fraction"]
