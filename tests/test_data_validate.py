"""`sera-ray data validate PATH` reports the format, the counts and every problem."""

from __future__ import annotations

import json

from sera_ray.data.validate import format_report, validate_path

GOOD = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_valid_file_reports_its_format_and_passes(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD])

    report = validate_path(path)

    assert report.ok
    assert format_report(report).splitlines() == [
        f"path: {path}",
        "format: jsonl, explicit prompt as text, responses as text",
        "rows read: 2",
        "rows valid: 2",
        "problems: 0",
        "ok",
    ]


def test_a_file_with_bad_rows_lists_them_and_fails(tmp_path):
    hh = "\n\nHuman: Hi\n\nAssistant:"
    rows = [
        {"chosen": hh + " Hello.", "rejected": hh + " Go away."},
        {"chosen": hh + " Hello.", "rejected": hh + " Hello."},
        {"chosen": "Yes.", "rejected": "No."},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)

    report = validate_path(path)

    assert not report.ok
    assert format_report(report).splitlines() == [
        f"path: {path}",
        "format: jsonl, implicit prompt, responses as text",
        "rows read: 3",
        "rows valid: 1",
        "problems: 2",
        f"  {path}:2: rejected: identical to chosen",
        f"  {path}:3: chosen/rejected: no shared prefix",
        "not ok",
    ]


def test_a_long_problem_list_is_cut_in_the_text_but_kept_in_the_report(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "chosen": ""}] * 5)

    report = validate_path(path)
    text = format_report(report, max_problems=2)

    assert len(report.problems) == 5
    assert text.splitlines()[-2:] == ["  ... and 3 more", "not ok"]


def test_a_missing_path_or_an_empty_file_is_not_valid(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")

    missing = validate_path(tmp_path / "absent.jsonl")
    empty = validate_path(tmp_path / "empty.jsonl")

    assert [str(p) for p in missing.problems] == [
        f"{tmp_path / 'absent.jsonl'}: path: does not exist"
    ]
    assert not missing.ok
    assert [str(p) for p in empty.problems] == [f"{tmp_path / 'empty.jsonl'}: rows: no rows"]
    assert (empty.rows_read, empty.ok) == (0, False)
