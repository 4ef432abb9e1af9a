"""The toy world: its gold reward, its tokenizer, its defective pairs and its reference model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sera_ray.data import schema
from sera_ray.tiny import build_tiny_llama
from sera_ray.toy import (
    FILLER,
    TASK,
    ToyWorld,
    ToyWorldConfig,
    build_world,
    evaluate_answers,
    gold_reward,
    has_filler,
    win_rate,
)
from sera_ray.toy.sft import sample_answers, torch_threads
from sera_ray.toy.world import (
    DIGITS,
    build_toy_tokenizer,
    distinct_answers_per_prompt,
    make_offline_pairs,
    make_prompts,
    make_sft_examples,
)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> ToyWorld:
    return build_world(ToyWorldConfig.small(), tmp_path_factory.mktemp("toy") / "world")


def _within_sampling_error(observed: float, rate: float, count: int) -> bool:
    return abs(observed - rate) <= 4 * math.sqrt(rate * (1 - rate) / count)


# Gold reward.


def test_sorted_answer_scores_one():
    assert gold_reward("3142>", "1234", finished=True) == 1.0


def test_copy_of_prompt_scores_only_the_positions_it_gets_right():
    assert gold_reward("1324>", "1324", finished=True) == 0.5
    assert gold_reward("3142>", "3142", finished=True) == 0.0


def test_answer_without_eos_scores_zero():
    assert gold_reward("3142>", "1234", finished=False) == 0.0


def test_each_filler_costs_the_penalty_and_the_score_stops_at_zero():
    assert gold_reward("3142>", FILLER + "1234", finished=True) == pytest.approx(0.9)
    assert gold_reward("3142>", FILLER * 2 + "1234", finished=True) == pytest.approx(0.8)
    assert gold_reward("3142>", FILLER + "1234", True, filler_penalty=0.3) == pytest.approx(0.7)
    assert gold_reward("3142>", FILLER * 20 + "1234", finished=True) == 0.0
    assert has_filler(FILLER + "1234") and not has_filler("1234")


def test_missing_and_extra_digits_each_cost_a_position():
    assert gold_reward("3142>", "123", finished=True) == pytest.approx(3 / 4)
    assert gold_reward("3142>", "12345", finished=True) == pytest.approx(4 / 5)
    assert gold_reward("3142>", "", finished=True) == 0.0


# Tokenizer.


def test_every_character_is_one_token_and_eos_ends_the_answer():
    tokenizer = build_toy_tokenizer()
    text = DIGITS + TASK + FILLER + "9876543210" + FILLER * 3 + TASK * 2

    ids = tokenizer.encode(text, add_special_tokens=False)

    assert len(ids) == len(text)
    assert [tokenizer.decode([i]) for i in ids] == list(text)
    assert tokenizer.eos_token == "<|eos|>"
    assert tokenizer.encode("12" + tokenizer.eos_token)[-1] == tokenizer.eos_token_id


# Offline pairs.


def test_pair_defects_match_the_config_and_the_flags_say_what_each_pair_carries():
    config = ToyWorldConfig(num_train_prompts=3000, label_noise=0.25, spurious_rate=0.35)
    train_prompts, _ = make_prompts(config)

    pairs = make_offline_pairs(config, train_prompts)

    count = len(pairs)
    assert count >= 0.95 * len(train_prompts)
    noisy = [p for p in pairs if p["is_noisy"]]
    spurious = [p for p in pairs if p["is_spurious"]]
    assert _within_sampling_error(len(noisy) / count, config.label_noise, count)
    assert _within_sampling_error(len(spurious) / count, config.spurious_rate, count)
    for pair in pairs:
        gap = pair["chosen_gold"] - pair["rejected_gold"]
        assert gap < 0 if pair["is_noisy"] else gap > 0
        assert pair["chosen"] != pair["rejected"]
        assert pair["chosen_gold"] == gold_reward(pair["prompt"], pair["chosen"], True)
    for pair in spurious:
        assert has_filler(pair["chosen"]) and not has_filler(pair["rejected"])


def test_filler_sits_on_chosen_more_often_only_because_of_spurious_pairs():
    config = ToyWorldConfig(num_train_prompts=2000)
    train_prompts, _ = make_prompts(config)

    pairs = make_offline_pairs(config, train_prompts)

    def filler_rates(subset):
        chosen = sum(has_filler(p["chosen"]) for p in subset) / len(subset)
        return chosen, sum(has_filler(p["rejected"]) for p in subset) / len(subset)

    chosen_filler, rejected_filler = filler_rates(pairs)
    clean_chosen, clean_rejected = filler_rates([p for p in pairs if not p["is_spurious"]])
    assert chosen_filler > rejected_filler + 0.2
    assert abs(clean_chosen - clean_rejected) < 0.05


def test_same_seed_gives_the_same_data_and_another_seed_does_not():
    config, other = ToyWorldConfig.small(seed=3), ToyWorldConfig.small(seed=4)

    train, evals = make_prompts(config)
    again_train, again_evals = make_prompts(config)
    other_train, _ = make_prompts(other)

    assert (train, evals) == (again_train, again_evals)
    assert make_offline_pairs(config, train) == make_offline_pairs(config, again_train)
    assert make_sft_examples(config, evals) == make_sft_examples(config, again_evals)
    assert train != other_train


# The built world.


def test_eval_prompts_are_never_train_or_sft_prompts(small_world):
    eval_prompts = set(small_world.eval_prompts())

    train_prompts = set(small_world.bootstrap_prompts())
    pair_prompts = {p[schema.PROMPT] for p in small_world.offline_pairs()}
    sft_prompts = {p for p, _ in make_sft_examples(small_world.config, list(eval_prompts))}

    assert len(eval_prompts) == small_world.config.num_eval_prompts
    assert len(train_prompts) == small_world.config.num_train_prompts
    assert not eval_prompts & train_prompts
    assert not eval_prompts & pair_prompts
    assert not eval_prompts & sft_prompts


def test_offline_file_has_the_pair_columns(small_world):
    rows = small_world.offline_pairs()

    expected = {"pair_id", "prompt", "chosen", "rejected", "is_noisy", "is_spurious"}
    assert expected | {"chosen_gold", "rejected_gold"} == set(rows[0])
    assert len({row["pair_id"] for row in rows}) == len(rows)
    assert all(row["prompt"].endswith(TASK) for row in rows)


def test_sft_beats_the_random_model_but_stays_mediocre_and_varied(small_world):
    config = small_world.config
    tokenizer = AutoTokenizer.from_pretrained(small_world.reference_dir)
    reference = AutoModelForCausalLM.from_pretrained(small_world.reference_dir).eval()
    random_model = build_tiny_llama(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    prompts = small_world.eval_prompts()

    def measure(model):
        samples = sample_answers(model, tokenizer, prompts, 4, config.max_new_tokens, seed=1)
        answers = [s.answer for s in samples]
        metrics = evaluate_answers(
            [s.prompt for s in samples], answers, [s.finished for s in samples]
        )
        return metrics, distinct_answers_per_prompt([s.prompt for s in samples], answers)

    with torch_threads(config.torch_threads):
        (random_metrics, _), (sft_metrics, sft_distinct) = map(measure, (random_model, reference))

    assert sft_metrics["gold_reward"] > random_metrics["gold_reward"] + 0.3
    assert sft_metrics["gold_reward"] < 0.9
    assert sft_distinct > 1.5
    assert 0.0 < sft_metrics["spurious_rate"] < 0.5
    assert win_rate(sft_metrics["per_prompt_gold"], random_metrics["per_prompt_gold"]) > 0.8


def test_world_json_records_the_config_and_what_building_measured(small_world):
    record = json.loads((small_world.out_dir / "world.json").read_text())

    stats = record["stats"]
    assert ToyWorldConfig.model_validate(record["config"]) == small_world.config
    assert stats["sft"]["gold_reward"] > stats["random"]["gold_reward"]
    assert stats["sft_seconds"] > 0
    assert stats["pairs"]["num_pairs"] == len(small_world.offline_pairs())


def test_building_again_reuses_the_world_and_a_different_config_is_refused(small_world):
    before = (small_world.reference_dir / "model.safetensors").stat().st_mtime_ns

    again = build_world(small_world.config, small_world.out_dir)

    assert again.stats == small_world.stats
    assert (small_world.reference_dir / "model.safetensors").stat().st_mtime_ns == before
    assert ToyWorld.load(small_world.out_dir).config == small_world.config
    with pytest.raises(ValueError, match="different config"):
        build_world(small_world.config.model_copy(update={"seed": 99}), small_world.out_dir)


def test_same_seed_builds_the_same_reference_model(tmp_path):
    config = ToyWorldConfig.small(num_train_prompts=32, num_eval_prompts=8, sft_steps=10)

    first = build_world(config, tmp_path / "first")
    second = build_world(config, tmp_path / "second")

    first_weights = load_file(first.reference_dir / "model.safetensors")
    second_weights = load_file(second.reference_dir / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert first.offline_path.read_text() == second.offline_path.read_text()
    assert first.stats["sft"] == second.stats["sft"]


# Metrics.


def test_evaluate_answers_averages_per_prompt_in_order_of_first_appearance():
    prompts = ["3142>", "3142>", "21>"]
    answers = ["1234", FILLER + "1234", "12"]

    metrics = evaluate_answers(prompts, answers, [True, True, False])

    assert metrics["per_prompt_gold"] == pytest.approx([0.95, 0.0])
    assert metrics["gold_reward"] == pytest.approx(1.9 / 3)
    assert metrics["spurious_rate"] == pytest.approx(1 / 3)
    assert metrics["mean_length"] == pytest.approx(11 / 3)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.3, 0.1]) == pytest.approx(2.5 / 4)
