"""Implicit rewards, the iteration ensemble, margins, and the scoring of pair tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sera_ray.algo.rewards import ensemble_reward, implicit_reward, margins, score_pairs
from sera_ray.data import schema


def scored_table(**extra_columns) -> pa.Table:
    """Two pairs with policy and reference log-probs and their token counts."""
    columns = {
        schema.PAIR_ID: ["a", "b"],
        schema.POLICY_CHOSEN_LOGP: [-4.0, -6.0],
        schema.POLICY_REJECTED_LOGP: [-9.0, -5.0],
        schema.REF_CHOSEN_LOGP: [-5.0, -6.0],
        schema.REF_REJECTED_LOGP: [-8.0, -6.0],
        schema.CHOSEN_LEN: pa.array([2, 3], type=pa.int32()),
        schema.REJECTED_LEN: pa.array([3, 1], type=pa.int32()),
    }
    columns.update(extra_columns)
    return pa.table(columns)


def test_implicit_reward_is_beta_times_the_policy_reference_log_ratio():
    policy = torch.tensor([-4.0, -6.0])
    reference = torch.tensor([-5.0, -4.0])

    reward = implicit_reward(policy, reference, beta=0.1)

    assert isinstance(reward, torch.Tensor)
    assert reward.tolist() == pytest.approx([0.1, -0.2])


def test_implicit_reward_of_numpy_arrays_is_a_numpy_array():
    reward = implicit_reward(np.array([-4.0, -6.0]), np.array([-5.0, -4.0]), beta=0.1)

    assert isinstance(reward, np.ndarray)
    assert reward.tolist() == pytest.approx([0.1, -0.2])


def test_simpo_implicit_reward_is_the_length_normalised_policy_log_prob():
    policy = np.array([-4.0, -6.0])

    reward = implicit_reward(policy, None, beta=2.0, kind="simpo", lengths=np.array([2, 3]))

    assert reward.tolist() == pytest.approx([-4.0, -4.0])


def test_simpo_implicit_reward_needs_the_lengths():
    with pytest.raises(ValueError, match="lengths"):
        implicit_reward(np.array([-4.0]), None, beta=2.0, kind="simpo")


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown loss kind"):
        implicit_reward(np.array([-4.0]), np.array([-4.0]), beta=0.1, kind="nope")


def test_ensemble_blends_the_current_and_previous_policy_rewards():
    current = np.array([1.0, -2.0])
    previous = np.array([3.0, 2.0])

    blended = ensemble_reward(current, previous, lam=0.25)

    assert blended.tolist() == pytest.approx([1.5, -1.0])


def test_ensemble_with_lambda_zero_is_the_current_reward_even_without_a_previous_policy():
    current = torch.tensor([1.0, -2.0])

    blended = ensemble_reward(current, None, lam=0.0)

    assert blended.tolist() == [1.0, -2.0]


def test_ensemble_with_positive_lambda_needs_the_previous_rewards():
    with pytest.raises(ValueError, match="previous"):
        ensemble_reward(np.array([1.0]), None, lam=0.5)


def test_ensemble_weight_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ensemble_reward(np.array([1.0]), np.array([1.0]), lam=1.5)


def test_margin_is_chosen_reward_minus_rejected_reward():
    assert margins(np.array([0.5, 0.1]), np.array([-0.5, 0.3])).tolist() == pytest.approx(
        [1.0, -0.2]
    )


def test_score_pairs_sets_rewards_and_margins_as_float64():
    table = scored_table()

    scored = score_pairs(table, beta=0.1, kind="dpo", lam=0.0)

    assert scored.column(schema.CHOSEN_REWARD).to_pylist() == pytest.approx([0.1, 0.0])
    assert scored.column(schema.REJECTED_REWARD).to_pylist() == pytest.approx([-0.1, 0.1])
    assert scored.column(schema.MARGIN).to_pylist() == pytest.approx([0.2, -0.1])
    for name in (schema.CHOSEN_REWARD, schema.REJECTED_REWARD, schema.MARGIN):
        assert scored.schema.field(name).type == pa.float64()


def test_score_pairs_replaces_rewards_from_an_earlier_iteration():
    table = scored_table(**{schema.MARGIN: [9.0, 9.0]})

    scored = score_pairs(table, beta=0.1, kind="dpo", lam=0.0)

    assert scored.column_names.count(schema.MARGIN) == 1
    assert scored.column(schema.MARGIN).to_pylist() == pytest.approx([0.2, -0.1])


def test_every_margin_is_zero_when_the_policy_is_the_reference():
    table = scored_table(
        **{
            schema.POLICY_CHOSEN_LOGP: [-5.0, -6.0],
            schema.POLICY_REJECTED_LOGP: [-8.0, -6.0],
        }
    )

    scored = score_pairs(table, beta=0.1, kind="dpo", lam=0.0)

    assert scored.column(schema.CHOSEN_REWARD).to_pylist() == [0.0, 0.0]
    assert scored.column(schema.MARGIN).to_pylist() == [0.0, 0.0]


def test_every_margin_is_zero_before_the_policy_has_been_scored():
    table = scored_table().drop_columns([schema.POLICY_CHOSEN_LOGP, schema.POLICY_REJECTED_LOGP])

    scored = score_pairs(table, beta=0.1, kind="ipo", lam=0.0)

    assert scored.column(schema.REJECTED_REWARD).to_pylist() == [0.0, 0.0]
    assert scored.column(schema.MARGIN).to_pylist() == [0.0, 0.0]


def test_score_pairs_blends_in_the_previous_policy():
    table = scored_table(
        **{
            schema.PREVIOUS_CHOSEN_LOGP: [-5.0, -6.0],
            schema.PREVIOUS_REJECTED_LOGP: [-8.0, -6.0],
        }
    )

    scored = score_pairs(table, beta=0.1, kind="dpo", lam=0.5)

    # The previous policy equals the reference, so its rewards are 0 and halve the current ones.
    assert scored.column(schema.MARGIN).to_pylist() == pytest.approx([0.1, -0.05])


def test_score_pairs_with_positive_lambda_needs_the_previous_policy_columns():
    with pytest.raises(ValueError, match=schema.PREVIOUS_CHOSEN_LOGP):
        score_pairs(scored_table(), beta=0.1, kind="dpo", lam=0.5)


def test_simpo_scores_ignore_the_reference_and_count_tokens_from_the_ids():
    table = pa.table(
        {
            schema.POLICY_CHOSEN_LOGP: [-4.0],
            schema.POLICY_REJECTED_LOGP: [-9.0],
            schema.CHOSEN_IDS: pa.array([[5, 6]], type=pa.list_(pa.int32())),
            schema.REJECTED_IDS: pa.array([[5, 6, 7]], type=pa.list_(pa.int32())),
        }
    )

    scored = score_pairs(table, beta=2.0, kind="simpo", lam=0.0)

    assert scored.column(schema.CHOSEN_REWARD).to_pylist() == pytest.approx([-4.0])
    assert scored.column(schema.REJECTED_REWARD).to_pylist() == pytest.approx([-6.0])
    assert scored.column(schema.MARGIN).to_pylist() == pytest.approx([2.0])


def test_simpo_scores_the_reference_log_probs_when_the_policy_is_the_reference():
    table = scored_table().drop_columns([schema.POLICY_CHOSEN_LOGP, schema.POLICY_REJECTED_LOGP])

    scored = score_pairs(table, beta=2.0, kind="simpo", lam=0.0)

    # 2 * -5 / 2 - 2 * -8 / 3 and 2 * -6 / 3 - 2 * -6 / 1.
    assert scored.column(schema.MARGIN).to_pylist() == pytest.approx([-5.0 + 16 / 3, 8.0])


def test_missing_log_probs_are_refused():
    table = scored_table(**{schema.REF_CHOSEN_LOGP: [-5.0, None]})

    with pytest.raises(ValueError, match="missing values"):
        score_pairs(table, beta=0.1, kind="dpo", lam=0.0)
