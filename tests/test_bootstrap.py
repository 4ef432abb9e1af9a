"""Preference bootstrapping: which sampled responses become a pair, and which prompts make none."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from sera_ray.algo.bootstrap import bootstrap_schema, build_bootstrap_pairs
from sera_ray.data import schema

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response", pa.string()),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("finished", pa.bool_()),
        pa.field("reward", pa.float64()),
        pa.field("policy_logp", pa.float64()),
        pa.field("ref_logp", pa.float64()),
        pa.field("response_len", pa.int32()),
    ]
)


def candidate(prompt_id: str, response_ids: list[int], reward: float, **overrides) -> dict:
    """One sampled response; its text is its token ids, its log-probs follow from its reward."""
    row = {
        "prompt_id": prompt_id,
        "prompt": f"prompt {prompt_id}",
        "prompt_ids": [1, 2],
        "response": " ".join(map(str, response_ids)),
        "response_ids": response_ids,
        "finished": True,
        "reward": reward,
        "policy_logp": -10.0 + reward,
        "ref_logp": -10.0,
        "response_len": len(response_ids),
    }
    row.update(overrides)
    return row


def candidates_table(rows: list[dict], candidate_schema: pa.Schema = CANDIDATE_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=candidate_schema)


def test_the_best_and_worst_response_of_a_prompt_become_chosen_and_rejected():
    candidates = candidates_table(
        [
            candidate("p", [5, 6], 0.2),
            candidate("p", [7, 8, 9], 0.9),
            candidate("p", [4], -0.4),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=2)

    pair = pairs.to_pylist()[0]
    assert pair[schema.PAIR_ID] == "bootstrap-2-p"
    assert pair[schema.SOURCE] == schema.SOURCE_BOOTSTRAP
    assert pair[schema.ITERATION] == 2
    assert pair[schema.PROMPT] == "prompt p"
    assert pair[schema.PROMPT_IDS] == [1, 2]
    assert pair[schema.CHOSEN_IDS] == [7, 8, 9]
    assert pair[schema.REJECTED_IDS] == [4]
    assert pair[schema.CHOSEN] == "7 8 9"
    assert pair[schema.TRUNCATED] is False
    assert pair[schema.POLICY_CHOSEN_LOGP] == pytest.approx(-9.1)
    assert pair[schema.REF_REJECTED_LOGP] == -10.0
    assert (pair[schema.CHOSEN_LEN], pair[schema.REJECTED_LEN]) == (3, 1)
    assert (pair[schema.CHOSEN_REWARD], pair[schema.REJECTED_REWARD]) == (0.9, -0.4)
    assert pair[schema.MARGIN] == pytest.approx(1.3)
    assert summary.pairs == 1
    assert summary.mean_margin == pytest.approx(1.3)


def test_truncated_responses_are_dropped_unless_asked_to_keep_them():
    candidates = candidates_table(
        [
            candidate("p", [5, 6], 0.2),
            candidate("p", [7, 8, 9], 0.9, finished=False),
            candidate("p", [4], -0.4),
        ]
    )

    dropped, dropped_summary = build_bootstrap_pairs(candidates, iteration=1)
    kept, kept_summary = build_bootstrap_pairs(candidates, iteration=1, drop_truncated=False)

    assert dropped.column(schema.CHOSEN_IDS).to_pylist() == [[5, 6]]
    assert dropped_summary.truncated_dropped == 1
    assert kept.column(schema.CHOSEN_IDS).to_pylist() == [[7, 8, 9]]
    assert kept_summary.truncated_dropped == 0


def test_duplicate_responses_count_once():
    candidates = candidates_table(
        [
            candidate("p", [5, 6], 0.5),
            candidate("p", [5, 6], 0.5),
            candidate("p", [4], 0.1),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.num_rows == 1
    assert summary.duplicate_dropped == 1


def test_a_truncated_copy_does_not_hide_the_finished_response():
    candidates = candidates_table(
        [
            candidate("p", [5, 6], 0.5, finished=False),
            candidate("p", [5, 6], 0.5),
            candidate("p", [4], 0.1),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.column(schema.CHOSEN_IDS).to_pylist() == [[5, 6]]
    assert (summary.truncated_dropped, summary.duplicate_dropped) == (1, 0)


def test_a_prompt_whose_responses_are_all_identical_makes_no_pair():
    candidates = candidates_table([candidate("p", [5, 6], 0.5) for _ in range(4)])

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.num_rows == 0
    assert summary.prompts_all_identical == 1
    assert summary.duplicate_dropped == 3


def test_a_prompt_with_one_finished_response_makes_no_pair():
    candidates = candidates_table(
        [
            candidate("p", [5, 6], 0.5),
            candidate("p", [7, 8], 0.9, finished=False),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.num_rows == 0
    assert summary.prompts_too_few_responses == 1
    assert summary.prompts_all_identical == 0


def test_distinct_responses_with_equal_rewards_are_a_tie_and_make_no_pair():
    candidates = candidates_table([candidate("p", [5], 0.3), candidate("p", [6], 0.3)])

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1, delta=-1.0)

    assert pairs.num_rows == 0
    assert summary.ties_dropped == 1


def test_a_margin_below_delta_makes_no_pair():
    candidates = candidates_table(
        [
            candidate("small", [5], 0.3),
            candidate("small", [6], 0.2),
            candidate("large", [5], 0.9),
            candidate("large", [6], 0.1),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=1, delta=0.5)

    assert pairs.column(schema.PAIR_ID).to_pylist() == ["bootstrap-1-large"]
    assert summary.below_delta_dropped == 1


def test_a_length_penalty_can_turn_a_long_winner_into_the_rejected_response():
    candidates = candidates_table(
        [
            candidate("p", [5] * 40, 1.0),
            candidate("p", [6] * 5, 0.8),
            candidate("p", [7] * 10, 0.75),
        ]
    )

    unpenalised, _ = build_bootstrap_pairs(candidates, iteration=1)
    penalised, _ = build_bootstrap_pairs(candidates, iteration=1, length_penalty=0.01)

    assert unpenalised.column(schema.CHOSEN_IDS).to_pylist() == [[5] * 40]
    assert penalised.column(schema.CHOSEN_IDS).to_pylist() == [[6] * 5]
    assert penalised.column(schema.REJECTED_IDS).to_pylist() == [[5] * 40]
    # Scores 1.0 - 0.4 and 0.8 - 0.05: the margin is penalised, the rewards are not.
    assert penalised.column(schema.MARGIN).to_pylist() == pytest.approx([0.15])
    assert penalised.column(schema.CHOSEN_REWARD).to_pylist() == [0.8]


def test_among_equal_best_responses_the_first_sampled_is_chosen():
    candidates = candidates_table(
        [
            candidate("p", [4], 0.1),
            candidate("p", [5], 0.9),
            candidate("p", [6], 0.9),
            candidate("p", [7], 0.1),
        ]
    )

    pairs, _ = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.column(schema.CHOSEN_IDS).to_pylist() == [[5]]
    assert pairs.column(schema.REJECTED_IDS).to_pylist() == [[4]]


def test_every_prompt_ends_as_a_pair_or_under_one_drop_reason():
    candidates = candidates_table(
        [
            candidate("pair", [1], 0.9),
            candidate("pair", [2], 0.1),
            candidate("identical", [1], 0.5),
            candidate("identical", [1], 0.5),
            candidate("truncated", [1], 0.5),
            candidate("truncated", [2], 0.5, finished=False),
            candidate("tie", [1], 0.5),
            candidate("tie", [2], 0.5),
            candidate("small", [1], 0.5),
            candidate("small", [2], 0.45),
        ]
    )

    pairs, summary = build_bootstrap_pairs(candidates, iteration=3, delta=0.1)

    assert pairs.column(schema.PAIR_ID).to_pylist() == ["bootstrap-3-pair"]
    assert summary.to_dict() == {
        "prompts": 5,
        "candidates": 10,
        "truncated_dropped": 1,
        "duplicate_dropped": 1,
        "prompts_too_few_responses": 1,
        "prompts_all_identical": 1,
        "ties_dropped": 1,
        "below_delta_dropped": 1,
        "pairs": 1,
        "mean_margin": pytest.approx(0.8),
    }


def test_pairs_have_the_tokenized_pair_schema_plus_scores():
    candidates = candidates_table([candidate("p", [5], 0.9), candidate("p", [6], 0.1)])

    pairs, _ = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.schema == bootstrap_schema()
    assert pairs.schema.names[: len(schema.TOKENIZED_SCHEMA)] == schema.TOKENIZED_SCHEMA.names
    for field in schema.TOKENIZED_SCHEMA:
        assert pairs.schema.field(field.name).type == field.type
    assert pairs.schema.field(schema.MARGIN).type == pa.float64()
    assert pairs.schema.field(schema.CHOSEN_LEN).type == pa.int32()


def test_no_pairs_still_have_the_full_schema():
    all_dropped = candidates_table([candidate("p", [5], 0.5), candidate("p", [6], 0.5)])
    no_candidates = candidates_table([])

    from_ties, _ = build_bootstrap_pairs(all_dropped, iteration=1)
    from_nothing, summary = build_bootstrap_pairs(no_candidates, iteration=1)

    assert from_ties.num_rows == 0
    assert from_ties.schema == bootstrap_schema()
    assert from_nothing.schema == bootstrap_schema()
    assert summary.prompts == 0
    assert summary.mean_margin is None


def test_token_ids_of_another_integer_type_come_out_as_int32():
    wide_schema = CANDIDATE_SCHEMA.set(
        CANDIDATE_SCHEMA.get_field_index("response_ids"),
        pa.field("response_ids", pa.list_(pa.int64())),
    )
    candidates = candidates_table(
        [candidate("p", [5], 0.9), candidate("p", [6], 0.1)], candidate_schema=wide_schema
    )

    pairs, _ = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.schema.field(schema.CHOSEN_IDS).type == pa.list_(pa.int32())


def test_the_model_that_sampled_each_response_is_carried_into_the_pair():
    with_source = CANDIDATE_SCHEMA.append(pa.field("candidate_source", pa.string()))
    candidates = candidates_table(
        [
            candidate("p", [5], 0.9, candidate_source="policy"),
            candidate("p", [6], 0.1, candidate_source="reference"),
        ],
        candidate_schema=with_source,
    )

    pairs, _ = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.schema == bootstrap_schema(with_candidate_source=True)
    assert pairs.column("chosen_candidate_source").to_pylist() == ["policy"]
    assert pairs.column("rejected_candidate_source").to_pylist() == ["reference"]


def test_columns_the_pairs_do_not_use_are_ignored():
    with_extra = CANDIDATE_SCHEMA.append(pa.field("sampling_seed", pa.int64()))
    candidates = candidates_table(
        [candidate("p", [5], 0.9, sampling_seed=1), candidate("p", [6], 0.1, sampling_seed=2)],
        candidate_schema=with_extra,
    )

    pairs, _ = build_bootstrap_pairs(candidates, iteration=1)

    assert pairs.schema == bootstrap_schema()


def test_a_candidate_table_without_rewards_is_refused():
    candidates = candidates_table([candidate("p", [5], 0.9)]).drop_columns(["reward"])

    with pytest.raises(ValueError, match="reward"):
        build_bootstrap_pairs(candidates, iteration=1)


def test_thousands_of_candidates_take_well_under_a_second():
    rng = np.random.default_rng(0)
    prompts, samples, length = 1000, 8, 48
    count = prompts * samples
    response_ids = rng.integers(0, 300, size=(count, length), dtype=np.int32)
    response_ids[1::2] = response_ids[::2]  # every other sample repeats the one before
    candidates = pa.table(
        {
            "prompt_id": pa.array([str(row // samples) for row in range(count)]),
            "prompt": pa.array(["a prompt"] * count),
            "prompt_ids": pa.array([[1, 2, 3]] * count, type=pa.list_(pa.int32())),
            "response": pa.array(["a response"] * count),
            "response_ids": pa.ListArray.from_arrays(
                pa.array(np.arange(0, count * length + 1, length, dtype=np.int32)),
                pa.array(response_ids.ravel()),
            ),
            "finished": pa.array(rng.random(count) > 0.1),
            "reward": pa.array(rng.normal(size=count)),
            "policy_logp": pa.array(rng.normal(size=count)),
            "ref_logp": pa.array(rng.normal(size=count)),
            "response_len": pa.array(np.full(count, length, dtype=np.int32)),
        }
    )

    start = time.perf_counter()
    pairs, summary = build_bootstrap_pairs(candidates, iteration=1, delta=0.1)
    seconds = time.perf_counter() - start

    assert seconds < 0.5
    assert summary.duplicate_dropped > 3000
    assert summary.pairs == pairs.num_rows > 900
