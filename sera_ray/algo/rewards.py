"""Implicit rewards and margins, as SeRA defines them.

From "SeRA: Self-Reviewing and Alignment of LLMs using Implicit Reward Margins": a policy trained
by a direct alignment algorithm carries an implicit reward r(x, y) = beta * (log pi(y|x) -
log pi_ref(y|x)), summed over the response tokens; for a reference-free loss such as SimPO it is
beta * log pi(y|x) / |y|. The reward of iteration t may blend the current and the previous policy,
r_t = (1 - lambda) * r(pi_t) + lambda * r(pi_{t-1}), and the margin of a pair is
r_t(x, y_chosen) - r_t(x, y_rejected).

The functions work on torch tensors and on numpy arrays alike and return what they were given.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sera_ray.algo.losses import is_reference_free
from sera_ray.data import schema

logger = logging.getLogger(__name__)

Scores = TypeVar("Scores", torch.Tensor, np.ndarray)


def implicit_reward(
    policy_logps: Scores,
    ref_logps: Scores | None,
    *,
    beta: float,
    kind: str = "dpo",
    lengths: Scores | None = None,
) -> Scores:
    """The implicit reward of each response under the loss `kind`.

    beta * (policy - reference) for the reference-based losses; beta * policy / lengths for the
    reference-free ones (SimPO), which ignore `ref_logps` and need the response token counts.
    """
    policy_logps = _as_scores(policy_logps)

    if is_reference_free(kind):
        if lengths is None:
            raise ValueError(f"the implicit reward of {kind} needs the response lengths")
        lengths = _like(lengths, policy_logps)
        if (lengths <= 0).any():
            raise ValueError("every response length must be positive")
        return beta * policy_logps / lengths

    if ref_logps is None:
        raise ValueError(f"the implicit reward of {kind} needs the reference log-probs")
    return beta * (policy_logps - _like(ref_logps, policy_logps))


def ensemble_reward(current: Scores, previous: Scores | None, lam: float) -> Scores:
    """Blend the implicit rewards of this iteration's policy and the one before it.

    (1 - lam) * current + lam * previous; with lam = 0 the current policy alone decides, and
    `previous` may be None.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the ensemble weight lam must be in [0, 1], got {lam}")
    if previous is None:
        if lam != 0.0:
            raise ValueError(f"lam = {lam} blends in the previous policy's rewards: pass them")
        return current
    return (1.0 - lam) * current + lam * _like(previous, current)


def margins(chosen_rewards: Scores, rejected_rewards: Scores) -> Scores:
    """The implicit reward margin of each pair: chosen reward minus rejected reward."""
    return chosen_rewards - _like(rejected_rewards, chosen_rewards)


def score_pairs(table: pa.Table, *, beta: float, kind: str, lam: float) -> pa.Table:
    """Set `chosen_reward`, `rejected_reward` and `margin` (float64) on a scored pair table.

    Reads the policy, reference and (when lam > 0) previous-policy log-prob columns, and the
    response lengths for a reference-free loss (`chosen_len` / `rejected_len`, or the lengths
    of `chosen_ids` / `rejected_ids`). Without policy columns the policy is the reference (the
    first iteration): every reward and margin of a reference-based loss is then 0, and a
    reference-free loss scores the reference log-probs as the policy's.
    """
    reference_free = is_reference_free(kind)
    has_policy = _has_pair_columns(table, schema.POLICY_CHOSEN_LOGP, schema.POLICY_REJECTED_LOGP)

    if not has_policy and not reference_free:
        zeros = np.zeros(table.num_rows, dtype=np.float64)
        logger.debug("scored %d pairs: policy is the reference, every margin is 0", len(zeros))
        return _with_rewards(table, zeros, zeros.copy())

    policy_columns = (
        (schema.POLICY_CHOSEN_LOGP, schema.POLICY_REJECTED_LOGP)
        if has_policy
        else (schema.REF_CHOSEN_LOGP, schema.REF_REJECTED_LOGP)
    )
    chosen_lengths = rejected_lengths = None
    if reference_free:
        chosen_lengths = _lengths(table, schema.CHOSEN_LEN, schema.CHOSEN_IDS)
        rejected_lengths = _lengths(table, schema.REJECTED_LEN, schema.REJECTED_IDS)

    def rewards_of(chosen_column: str, rejected_column: str) -> tuple[np.ndarray, np.ndarray]:
        ref_chosen = ref_rejected = None
        if not reference_free:
            ref_chosen = _float_column(table, schema.REF_CHOSEN_LOGP)
            ref_rejected = _float_column(table, schema.REF_REJECTED_LOGP)
        chosen = implicit_reward(
            _float_column(table, chosen_column),
            ref_chosen,
            beta=beta,
            kind=kind,
            lengths=chosen_lengths,
        )
        rejected = implicit_reward(
            _float_column(table, rejected_column),
            ref_rejected,
            beta=beta,
            kind=kind,
            lengths=rejected_lengths,
        )
        return chosen, rejected

    chosen_rewards, rejected_rewards = rewards_of(*policy_columns)

    previous_chosen = previous_rejected = None
    if lam != 0.0:
        if not _has_pair_columns(table, schema.PREVIOUS_CHOSEN_LOGP, schema.PREVIOUS_REJECTED_LOGP):
            raise ValueError(
                f"lam = {lam} needs the previous policy's log-probs: columns "
                f"{schema.PREVIOUS_CHOSEN_LOGP} and {schema.PREVIOUS_REJECTED_LOGP}"
            )
        previous_chosen, previous_rejected = rewards_of(
            schema.PREVIOUS_CHOSEN_LOGP, schema.PREVIOUS_REJECTED_LOGP
        )
    chosen_rewards = ensemble_reward(chosen_rewards, previous_chosen, lam)
    rejected_rewards = ensemble_reward(rejected_rewards, previous_rejected, lam)

    logger.debug("scored %d pairs with the %s implicit reward", table.num_rows, kind)
    return _with_rewards(table, chosen_rewards, rejected_rewards)


def _with_rewards(
    table: pa.Table, chosen_rewards: np.ndarray, rejected_rewards: np.ndarray
) -> pa.Table:
    for name, values in (
        (schema.CHOSEN_REWARD, chosen_rewards),
        (schema.REJECTED_REWARD, rejected_rewards),
        (schema.MARGIN, margins(chosen_rewards, rejected_rewards)),
    ):
        table = _set_column(table, name, pa.array(values, type=pa.float64()))
    return table


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, values)
    return table.append_column(name, values)


def _has_pair_columns(table: pa.Table, chosen_column: str, rejected_column: str) -> bool:
    present = [name in table.column_names for name in (chosen_column, rejected_column)]
    if any(present) and not all(present):
        raise ValueError(f"columns {chosen_column} and {rejected_column} come together")
    return all(present)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        raise ValueError(f"the pair table has no column {name}")
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"column {name} has {column.null_count} missing values")
    return column.to_numpy().astype(np.float64, copy=False)


def _lengths(table: pa.Table, length_column: str, ids_column: str) -> np.ndarray:
    """Response token counts: the `_len` column, or else the lengths of the token id lists."""
    if length_column in table.column_names:
        return _float_column(table, length_column)
    if ids_column in table.column_names:
        return pc.list_value_length(table.column(ids_column)).to_numpy().astype(np.float64)
    raise ValueError(f"the pair table has neither {length_column} nor {ids_column}")


def _as_scores(values):
    if isinstance(values, torch.Tensor):
        return values
    return np.asarray(values, dtype=np.float64)


def _like(values, like):
    """`values` as the same kind of array as `like` (tensor dtype and device, or float64)."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=np.float64)
