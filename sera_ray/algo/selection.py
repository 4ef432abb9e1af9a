"""Selection of offline pairs by implicit reward margin.

SeRA keeps the pairs whose implicit reward margin is largest: small or negative margins are
where noisy labels and spurious features (length, style) concentrate, so training on them
teaches the policy the noise. Selection keeps either a top fraction rho of the pairs or every
pair whose margin reaches a threshold, and summarises what it kept so a run can show how the
margin relates to response length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_ray.data import schema

logger = logging.getLogger(__name__)

QUANTILES = (0, 10, 25, 50, 75, 90, 100)


@dataclass(frozen=True)
class SelectionSummary:
    """What selection kept, with the margin distribution of all pairs and of the kept ones.

    The quantile dicts are keyed q0, q10, ..., q100 and empty when there are no pairs to
    summarise. `margin_length_correlation` is the Pearson correlation between the margin and
    the chosen-minus-rejected response length over all pairs: a strongly positive value means
    the margin partly measures length, and selection by margin then also selects for length.
    """

    total: int
    kept: int
    dropped: int
    margin_quantiles: dict[str, float]
    kept_margin_quantiles: dict[str, float]
    margin_length_correlation: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        """A flat dict for metrics: `margin_q50`, `kept_margin_q50`, ..."""
        flat = asdict(self)
        for name in ("margin_quantiles", "kept_margin_quantiles"):
            prefix = name.removesuffix("quantiles")
            flat.update({prefix + key: value for key, value in flat.pop(name).items()})
        return flat


def select_by_margin(
    margins: np.ndarray,
    *,
    top_fraction: float | None = None,
    threshold: float | None = None,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, SelectionSummary]:
    """Keep the pairs with the largest margins; return the boolean kept mask and a summary.

    Exactly one rule applies: `top_fraction` rho keeps the ceil(rho * n) largest margins (equal
    margins are kept in their order in `margins`), `threshold` keeps every margin >= threshold.
    Equal margins everywhere (the first iteration) still keep ceil(rho * n) pairs; keeping all
    pairs in the first iteration is the caller's decision. The lengths only feed the summary.
    """
    if (top_fraction is None) == (threshold is None):
        raise ValueError("pass exactly one of top_fraction and threshold")
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 1:
        raise ValueError(f"margins must be one-dimensional, got shape {margins.shape}")
    if np.isnan(margins).any():
        raise ValueError("margins contain NaN: score every pair before selection")

    if top_fraction is not None:
        kept = _top_fraction_mask(margins, top_fraction)
    else:
        kept = margins >= threshold

    summary = SelectionSummary(
        total=len(margins),
        kept=int(kept.sum()),
        dropped=int(len(margins) - kept.sum()),
        margin_quantiles=_quantiles(margins),
        kept_margin_quantiles=_quantiles(margins[kept]),
        margin_length_correlation=_length_correlation(margins, chosen_lengths, rejected_lengths),
    )
    return kept, summary


def select_pairs(
    table: pa.Table, *, top_fraction: float | None = None, threshold: float | None = None
) -> tuple[pa.Table, SelectionSummary]:
    """Select pairs of a scored pair table by its `margin` column; set the `kept` column.

    Response lengths for the summary come from `chosen_len` / `rejected_len`, or else from the
    lengths of `chosen_ids` / `rejected_ids`; without either the correlation is None.
    """
    if schema.MARGIN not in table.column_names:
        raise ValueError(f"the pair table has no {schema.MARGIN} column: score it first")
    margin_column = table.column(schema.MARGIN)
    if margin_column.null_count:
        raise ValueError(f"{margin_column.null_count} pairs have no margin: score them first")

    kept, summary = select_by_margin(
        margin_column.to_numpy(),
        top_fraction=top_fraction,
        threshold=threshold,
        chosen_lengths=_lengths(table, schema.CHOSEN_LEN, schema.CHOSEN_IDS),
        rejected_lengths=_lengths(table, schema.REJECTED_LEN, schema.REJECTED_IDS),
    )

    kept_column = pa.array(kept, type=pa.bool_())
    index = table.schema.get_field_index(schema.KEPT)
    if index >= 0:
        table = table.set_column(index, schema.KEPT, kept_column)
    else:
        table = table.append_column(schema.KEPT, kept_column)
    logger.debug("selection kept %d of %d pairs", summary.kept, summary.total)
    return table, summary


def _top_fraction_mask(margins: np.ndarray, top_fraction: float) -> np.ndarray:
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    # Rounding first keeps float noise (0.7 * 10 = 7.000000000000001) from adding a pair.
    count = math.ceil(round(top_fraction * len(margins), 9))
    order = np.argsort(-margins, kind="stable")
    kept = np.zeros(len(margins), dtype=bool)
    kept[order[:count]] = True
    return kept


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    points = np.percentile(values, QUANTILES)
    return {f"q{q}": float(point) for q, point in zip(QUANTILES, points)}


def _length_correlation(
    margins: np.ndarray,
    chosen_lengths: np.ndarray | None,
    rejected_lengths: np.ndarray | None,
) -> float | None:
    if chosen_lengths is None and rejected_lengths is None:
        return None
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    length_differences = np.asarray(chosen_lengths, dtype=np.float64) - np.asarray(
        rejected_lengths, dtype=np.float64
    )
    if length_differences.shape != margins.shape:
        raise ValueError("the lengths must have one entry per margin")
    if len(margins) < 2 or np.ptp(margins) == 0 or np.ptp(length_differences) == 0:
        return None
    return float(np.corrcoef(margins, length_differences)[0, 1])


def _lengths(table: pa.Table, length_column: str, ids_column: str) -> np.ndarray | None:
    if length_column in table.column_names:
        return table.column(length_column).to_numpy()
    if ids_column in table.column_names:
        return pc.list_value_length(table.column(ids_column)).to_numpy()
    return None
