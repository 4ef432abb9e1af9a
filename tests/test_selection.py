"""Selection of pairs by implicit reward margin, and the summary it reports."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sera_ray.algo.selection import select_by_margin, select_pairs
from sera_ray.data import schema


def test_top_fraction_keeps_the_pairs_with_the_largest_margins():
    margins = np.array([0.3, -1.0, 2.0, 0.1, 1.5])

    kept, summary = select_by_margin(margins, top_fraction=0.4)

    assert kept.tolist() == [False, False, True, False, True]
    assert (summary.total, summary.kept, summary.dropped) == (5, 2, 3)


def test_top_fraction_rounds_the_count_up():
    margins = np.arange(10, dtype=np.float64)

    kept_quarter, _ = select_by_margin(margins, top_fraction=0.25)
    kept_seven_tenths, _ = select_by_margin(margins, top_fraction=0.7)

    assert kept_quarter.sum() == 3
    assert kept_seven_tenths.sum() == 7


def test_equal_margins_are_kept_in_order_of_appearance():
    margins = np.array([1.0, 0.5, 0.5, 0.5, 2.0])

    kept, _ = select_by_margin(margins, top_fraction=0.6)

    assert kept.tolist() == [True, True, False, False, True]


def test_top_fraction_keeps_its_share_even_when_every_margin_is_zero():
    margins = np.zeros(5)

    kept, summary = select_by_margin(margins, top_fraction=0.5)

    assert kept.tolist() == [True, True, True, False, False]
    assert summary.margin_length_correlation is None


def test_threshold_keeps_every_margin_at_or_above_it():
    margins = np.array([0.3, -1.0, 2.0, 0.1, 1.5])

    kept, summary = select_by_margin(margins, threshold=0.3)

    assert kept.tolist() == [True, False, True, False, True]
    assert summary.kept == 3


@pytest.mark.parametrize(
    "rule", [{}, {"top_fraction": 0.5, "threshold": 0.0}], ids=["neither", "both"]
)
def test_exactly_one_rule_must_be_given(rule):
    with pytest.raises(ValueError, match="exactly one"):
        select_by_margin(np.array([1.0, 2.0]), **rule)


def test_top_fraction_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="top_fraction"):
        select_by_margin(np.array([1.0, 2.0]), top_fraction=0.0)


def test_summary_reports_quantiles_of_all_and_of_kept_margins():
    margins = np.arange(11, dtype=np.float64)

    _, summary = select_by_margin(margins, top_fraction=0.5)

    assert summary.margin_quantiles == pytest.approx(
        {"q0": 0.0, "q10": 1.0, "q25": 2.5, "q50": 5.0, "q75": 7.5, "q90": 9.0, "q100": 10.0}
    )
    assert summary.kept_margin_quantiles["q0"] == 5.0
    assert summary.kept_margin_quantiles["q100"] == 10.0


def test_margin_length_correlation_is_positive_when_longer_chosen_responses_get_larger_margins():
    rng = np.random.default_rng(0)
    chosen_lengths = rng.integers(10, 60, size=200)
    rejected_lengths = rng.integers(10, 60, size=200)
    margins = 0.05 * (chosen_lengths - rejected_lengths) + rng.normal(0.0, 0.5, size=200)

    _, summary = select_by_margin(
        margins,
        top_fraction=0.5,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )

    assert summary.margin_length_correlation > 0.8


def test_margin_length_correlation_is_negative_when_shorter_chosen_responses_win():
    margins = np.array([3.0, 2.0, 1.0, 0.0])

    _, summary = select_by_margin(
        margins,
        threshold=1.0,
        chosen_lengths=np.array([5, 10, 15, 20]),
        rejected_lengths=np.array([10, 10, 10, 10]),
    )

    assert summary.margin_length_correlation == pytest.approx(-1.0)


def test_margin_length_correlation_is_none_without_lengths_or_without_length_variance():
    margins = np.array([3.0, 2.0, 1.0])

    _, without_lengths = select_by_margin(margins, threshold=1.0)
    _, equal_lengths = select_by_margin(
        margins,
        threshold=1.0,
        chosen_lengths=np.array([7, 8, 9]),
        rejected_lengths=np.array([2, 3, 4]),
    )

    assert without_lengths.margin_length_correlation is None
    assert equal_lengths.margin_length_correlation is None


def test_summary_flattens_to_metric_names():
    _, summary = select_by_margin(np.array([1.0, 2.0, 3.0]), threshold=2.0)

    metrics = summary.to_dict()

    assert metrics["total"] == 3
    assert metrics["kept"] == 2
    assert metrics["dropped"] == 1
    assert metrics["margin_q50"] == 2.0
    assert metrics["kept_margin_q0"] == 2.0
    assert metrics["margin_length_correlation"] is None


def test_nothing_kept_leaves_the_kept_quantiles_empty():
    _, summary = select_by_margin(np.array([1.0, 2.0]), threshold=5.0)

    assert summary.kept == 0
    assert summary.kept_margin_quantiles == {}


def test_select_pairs_adds_the_kept_column_and_reads_lengths_from_the_token_ids():
    table = pa.table(
        {
            schema.PAIR_ID: ["a", "b", "c"],
            schema.CHOSEN_IDS: pa.array([[1, 2, 3], [1], [1, 2]], type=pa.list_(pa.int32())),
            schema.REJECTED_IDS: pa.array([[1], [1, 2, 3], [1, 2]], type=pa.list_(pa.int32())),
            schema.MARGIN: [2.0, -2.0, 0.0],
        }
    )

    selected, summary = select_pairs(table, top_fraction=0.5)

    assert selected.column(schema.KEPT).to_pylist() == [True, False, True]
    assert selected.schema.field(schema.KEPT).type == pa.bool_()
    assert summary.margin_length_correlation == pytest.approx(1.0)


def test_select_pairs_replaces_the_kept_column_of_an_earlier_selection():
    table = pa.table(
        {
            schema.MARGIN: [2.0, -2.0],
            schema.CHOSEN_LEN: pa.array([3, 3], type=pa.int32()),
            schema.REJECTED_LEN: pa.array([3, 3], type=pa.int32()),
            schema.KEPT: [False, True],
        }
    )

    selected, _ = select_pairs(table, threshold=0.0)

    assert selected.column_names.count(schema.KEPT) == 1
    assert selected.column(schema.KEPT).to_pylist() == [True, False]


def test_select_pairs_needs_scored_pairs():
    table = pa.table({schema.PAIR_ID: ["a"]})

    with pytest.raises(ValueError, match="score it first"):
        select_pairs(table, top_fraction=0.5)
