"""Preference bootstrapping: on-policy pairs made of the best and worst sampled responses.

From "SeRA: Self-Reviewing and Alignment of LLMs using Implicit Reward Margins": for a subset of
prompts the updated policy samples N responses, each is scored by the implicit reward, and the
highest and lowest scored responses become the chosen and rejected response of a new pair.
These pairs join the selected offline pairs in the next iteration's training. A pair is only
worth training on when its two responses differ and its margin is real, so truncated responses,
duplicates, ties and margins below `delta` are dropped, and a length penalty can keep the
implicit reward's preference for length out of the choice.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_ray.data import schema

logger = logging.getLogger(__name__)

# Columns of the candidate table: one row per sampled response.
PROMPT_ID = "prompt_id"
RESPONSE = "response"
RESPONSE_IDS = "response_ids"
FINISHED = "finished"  # the response ended with EOS
REWARD = "reward"  # the implicit reward, already blended across iterations
POLICY_LOGP = "policy_logp"
REF_LOGP = "ref_logp"
RESPONSE_LEN = "response_len"
CANDIDATE_SOURCE = "candidate_source"  # optional: which model sampled the response

CANDIDATE_COLUMNS = (
    PROMPT_ID,
    schema.PROMPT,
    schema.PROMPT_IDS,
    RESPONSE,
    RESPONSE_IDS,
    FINISHED,
    REWARD,
    POLICY_LOGP,
    REF_LOGP,
    RESPONSE_LEN,
)

# What a generator returns: the sampled responses before any scoring.
SAMPLED_SCHEMA = pa.schema(
    [
        pa.field(PROMPT_ID, pa.string()),
        pa.field(schema.PROMPT, pa.string()),
        pa.field(schema.PROMPT_IDS, pa.list_(pa.int32())),
        pa.field(RESPONSE, pa.string()),
        pa.field(RESPONSE_IDS, pa.list_(pa.int32())),
        pa.field(FINISHED, pa.bool_()),
        pa.field(RESPONSE_LEN, pa.int32()),
        pa.field(CANDIDATE_SOURCE, pa.string()),
    ]
)

SCORE_FIELDS = [
    pa.field(schema.REF_CHOSEN_LOGP, pa.float64()),
    pa.field(schema.REF_REJECTED_LOGP, pa.float64()),
    pa.field(schema.POLICY_CHOSEN_LOGP, pa.float64()),
    pa.field(schema.POLICY_REJECTED_LOGP, pa.float64()),
    pa.field(schema.CHOSEN_LEN, pa.int32()),
    pa.field(schema.REJECTED_LEN, pa.int32()),
    pa.field(schema.CHOSEN_REWARD, pa.float64()),
    pa.field(schema.REJECTED_REWARD, pa.float64()),
    pa.field(schema.MARGIN, pa.float64()),
]
BOOTSTRAP_SCHEMA = pa.schema(schema.TOKENIZED_FIELDS + SCORE_FIELDS)


@dataclass(frozen=True)
class BootstrapSummary:
    """Where the candidates went: every prompt ends as a pair or under one drop reason.

    `prompts_too_few_responses` counts prompts left with fewer than two responses once the
    truncated ones are dropped; `prompts_all_identical` those with two or more left that were
    all the same response. `mean_margin` is over the pairs made, None when there are none.
    """

    prompts: int
    candidates: int
    truncated_dropped: int
    duplicate_dropped: int
    prompts_too_few_responses: int
    prompts_all_identical: int
    ties_dropped: int
    below_delta_dropped: int
    pairs: int
    mean_margin: float | None

    def to_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


def bootstrap_schema(with_candidate_source: bool = False) -> pa.Schema:
    """The schema of a bootstrapped pair table, with the candidate-source columns if asked."""
    if not with_candidate_source:
        return BOOTSTRAP_SCHEMA
    return BOOTSTRAP_SCHEMA.append(
        pa.field(f"{schema.CHOSEN}_{CANDIDATE_SOURCE}", pa.string())
    ).append(pa.field(f"{schema.REJECTED}_{CANDIDATE_SOURCE}", pa.string()))


def build_bootstrap_pairs(
    candidates: pa.Table,
    *,
    iteration: int,
    delta: float = 0.0,
    length_penalty: float = 0.0,
    drop_truncated: bool = True,
) -> tuple[pa.Table, BootstrapSummary]:
    """Make at most one pair per prompt from its scored candidate responses.

    Per prompt, in order:
    1. drop truncated responses (when `drop_truncated`), then duplicates (equal `response_ids`,
       the first kept); a prompt with fewer than two distinct responses left makes no pair;
    2. score each response by reward - length_penalty * response_len;
    3. the highest score is chosen, the lowest rejected (the first one wins among equals);
    4. drop the pair when its margin (chosen score - rejected score) is 0, or below `delta`.

    The pair's `margin` is that length-penalised margin; `chosen_reward` and `rejected_reward`
    are the implicit rewards themselves, so they differ by `margin` only without a penalty.
    Pairs come out in the order their prompts first appear.
    """
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    _check_candidates(candidates)
    with_source = CANDIDATE_SOURCE in candidates.column_names

    # 1. Group by prompt, drop truncated responses and duplicates.
    prompt_codes, prompt_count = _prompt_codes(candidates)
    finished = candidates.column(FINISHED).to_numpy(zero_copy_only=False).astype(bool)
    remaining = finished if drop_truncated else np.ones(candidates.num_rows, dtype=bool)
    distinct = _first_occurrences(candidates.column(RESPONSE_IDS), prompt_codes, remaining)

    remaining_per_prompt = np.bincount(prompt_codes[remaining], minlength=prompt_count)
    distinct_per_prompt = np.bincount(prompt_codes[distinct], minlength=prompt_count)
    too_few = remaining_per_prompt < 2
    all_identical = ~too_few & (distinct_per_prompt < 2)

    # 2. Length-penalised scores.
    rewards = candidates.column(REWARD).to_numpy().astype(np.float64, copy=False)
    lengths = candidates.column(RESPONSE_LEN).to_numpy().astype(np.float64)
    scores = rewards - length_penalty * lengths

    # 3. Best and worst response per prompt; prompts without two distinct responses are skipped.
    rows = np.flatnonzero(distinct & (distinct_per_prompt >= 2)[prompt_codes])
    chosen_rows = _first_per_prompt(prompt_codes[rows], -scores[rows], rows)
    rejected_rows = _first_per_prompt(prompt_codes[rows], scores[rows], rows)
    pair_margins = scores[chosen_rows] - scores[rejected_rows]

    # 4. Ties and margins below delta.
    ties = pair_margins <= 0.0
    below_delta = ~ties & (pair_margins < delta)
    made = ~ties & ~below_delta
    chosen_rows, rejected_rows, pair_margins = (
        chosen_rows[made],
        rejected_rows[made],
        pair_margins[made],
    )

    pairs = _pair_table(candidates, chosen_rows, rejected_rows, pair_margins, iteration)
    pairs = pairs.cast(bootstrap_schema(with_source))
    summary = BootstrapSummary(
        prompts=prompt_count,
        candidates=candidates.num_rows,
        truncated_dropped=int((~finished).sum()) if drop_truncated else 0,
        duplicate_dropped=int(remaining.sum() - distinct.sum()),
        prompts_too_few_responses=int(too_few.sum()),
        prompts_all_identical=int(all_identical.sum()),
        ties_dropped=int(ties.sum()),
        below_delta_dropped=int(below_delta.sum()),
        pairs=pairs.num_rows,
        mean_margin=float(pair_margins.mean()) if len(pair_margins) else None,
    )
    logger.debug("bootstrapping iteration %d: %s", iteration, summary)
    return pairs, summary


def _check_candidates(candidates: pa.Table) -> None:
    missing = [name for name in CANDIDATE_COLUMNS if name not in candidates.column_names]
    if missing:
        raise ValueError(f"the candidate table lacks columns {missing}")
    for name in CANDIDATE_COLUMNS:
        nulls = candidates.column(name).null_count
        if nulls:
            raise ValueError(f"column {name} of the candidate table has {nulls} missing values")
    if np.isnan(candidates.column(REWARD).to_numpy()).any():
        raise ValueError("some candidate rewards are NaN: score every candidate first")


def _prompt_codes(candidates: pa.Table) -> tuple[np.ndarray, int]:
    """A code per row for its prompt, numbered in order of first appearance, and their count."""
    encoded = pc.dictionary_encode(candidates.column(PROMPT_ID).combine_chunks())
    return encoded.indices.to_numpy().astype(np.int64), len(encoded.dictionary)


def _first_occurrences(
    response_ids: pa.ChunkedArray, prompt_codes: np.ndarray, among: np.ndarray
) -> np.ndarray:
    """True for the first row, of those in `among`, of each distinct (prompt, response ids)."""
    ids = response_ids.combine_chunks()
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)
    first = np.zeros(len(ids), dtype=bool)
    seen: set[tuple[int, bytes]] = set()
    for row in np.flatnonzero(among):
        key = (int(prompt_codes[row]), values[offsets[row] : offsets[row + 1]].tobytes())
        if key not in seen:
            seen.add(key)
            first[row] = True
    return first


def _first_per_prompt(codes: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per prompt code, in code order, the row with the smallest key (earliest among equals)."""
    if len(codes) == 0:
        return rows
    order = np.lexsort((rows, keys, codes))
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    return rows[order[starts]]


def _pair_table(
    candidates: pa.Table,
    chosen_rows: np.ndarray,
    rejected_rows: np.ndarray,
    pair_margins: np.ndarray,
    iteration: int,
) -> pa.Table:
    chosen = candidates.take(pa.array(chosen_rows, type=pa.int64()))
    rejected = candidates.take(pa.array(rejected_rows, type=pa.int64()))
    count = len(chosen_rows)

    columns = {
        schema.PAIR_ID: pa.array(
            [f"bootstrap-{iteration}-{p}" for p in chosen.column(PROMPT_ID).to_pylist()],
            type=pa.string(),
        ),
        schema.SOURCE: pa.array([schema.SOURCE_BOOTSTRAP] * count, type=pa.string()),
        schema.ITERATION: pa.array([iteration] * count, type=pa.int32()),
        schema.PROMPT: chosen.column(schema.PROMPT),
        schema.CHOSEN: chosen.column(RESPONSE),
        schema.REJECTED: rejected.column(RESPONSE),
        schema.PROMPT_IDS: chosen.column(schema.PROMPT_IDS),
        schema.CHOSEN_IDS: chosen.column(RESPONSE_IDS),
        schema.REJECTED_IDS: rejected.column(RESPONSE_IDS),
        schema.TRUNCATED: pa.array([False] * count, type=pa.bool_()),
        schema.REF_CHOSEN_LOGP: chosen.column(REF_LOGP),
        schema.REF_REJECTED_LOGP: rejected.column(REF_LOGP),
        schema.POLICY_CHOSEN_LOGP: chosen.column(POLICY_LOGP),
        schema.POLICY_REJECTED_LOGP: rejected.column(POLICY_LOGP),
        schema.CHOSEN_LEN: chosen.column(RESPONSE_LEN),
        schema.REJECTED_LEN: rejected.column(RESPONSE_LEN),
        schema.CHOSEN_REWARD: chosen.column(REWARD),
        schema.REJECTED_REWARD: rejected.column(REWARD),
        schema.MARGIN: pa.array(pair_margins, type=pa.float64()),
    }
    if CANDIDATE_SOURCE in candidates.column_names:
        columns[f"{schema.CHOSEN}_{CANDIDATE_SOURCE}"] = chosen.column(CANDIDATE_SOURCE)
        columns[f"{schema.REJECTED}_{CANDIDATE_SOURCE}"] = rejected.column(CANDIDATE_SOURCE)
    return pa.table(columns)
