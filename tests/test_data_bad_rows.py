"""Bad rows are reported by file, row and field; they are never dropped silently."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sera_ray.data import schema
from sera_ray.data.formats import load_pairs, rejected_path_for
from sera_ray.data.problems import DataError

GOOD = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}
HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant:"
HH_GOOD = {"chosen": HH_PROMPT + " It is 4.", "rejected": HH_PROMPT + " It is 5."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def problems_of(path, **options):
    with pytest.raises(DataError) as caught:
        load_pairs(path, **options)
    return caught.value


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"prompt": "What is 2+2?", "chosen": "It is 4."}, "rejected", "missing"),
        ({**GOOD, "chosen": None}, "chosen", "missing"),
        ({**GOOD, "chosen": 4}, "chosen", "expected a string"),
        ({**GOOD, "prompt": ["What is 2+2?"]}, "prompt", "expected a string"),
        ({**GOOD, "rejected": "   "}, "rejected", "empty response"),
        ({**GOOD, "rejected": "It is 4."}, "rejected", "identical to chosen"),
        ({**GOOD, "chosen": "It is \ud800."}, "chosen", "undecodable text"),
    ],
    ids=["missing", "null", "wrong-type", "wrong-prompt-type", "empty", "identical", "surrogate"],
)
def test_each_bad_explicit_row_names_file_row_and_field(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, bad])

    error = problems_of(path)

    assert [(p.file, p.row, p.field) for p in error.problems] == [(str(path), 2, field)]
    assert f"{path}:2: {field}: {reason}" in str(error)


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"chosen": "Yes, it is.", "rejected": "No, it is not."}, "chosen/rejected", "no shared"),
        ({**HH_GOOD, "rejected": HH_GOOD["chosen"]}, "rejected", "identical to chosen"),
        ({"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT}, "rejected", "empty response"),
    ],
    ids=["no-shared-prefix", "identical", "empty"],
)
def test_each_bad_implicit_row_names_file_row_and_field(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_GOOD, bad])

    error = problems_of(path)

    assert f"{path}:2: {field}: {reason}" in str(error)


def test_bad_chat_messages_name_the_message_and_key(tmp_path):
    user = {"role": "user", "content": "Hi"}
    rows = [
        {"prompt": "Hi", "chosen": [user, {"role": "assistant"}], "rejected": [user, user]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)

    error = problems_of(path)

    assert f"{path}:1: chosen[1].content: missing" in str(error)


def test_a_last_message_not_from_the_assistant_is_reported(tmp_path):
    user = {"role": "user", "content": "Hi"}
    rows = [
        {
            "prompt": "Hi",
            "chosen": [user, {"role": "assistant", "content": "Hey"}],
            "rejected": [user],
        }
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)

    error = problems_of(path)

    assert f"{path}:1: rejected[-1].role: expected 'assistant', got 'user'" in str(error)


def test_invalid_utf8_in_jsonl_names_the_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b'\n{"prompt": "p", "chosen": "caf\xe9", "rejected": "no"}\n'
    )

    error = problems_of(path)

    assert f"{path}:2: chosen: undecodable text" in str(error)


def test_invalid_utf8_in_a_parquet_binary_column_names_the_row(tmp_path):
    table = pa.table(
        {
            "prompt": ["p", "q"],
            "chosen": pa.array([b"yes", b"caf\xe9"], type=pa.binary()),
            "rejected": pa.array([b"no", b"tea"], type=pa.binary()),
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)

    error = problems_of(path)

    assert f"{path}:1: chosen: undecodable text" in str(error)


def test_invalid_utf8_in_a_parquet_string_column_names_the_row(tmp_path):
    invalid = pa.array([b"yes", b"caf\xe9"], type=pa.binary()).view(pa.string())
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"prompt": ["p", "q"], "chosen": invalid, "rejected": ["a", "b"]}), path
    )

    error = problems_of(path)

    assert [str(p) for p in error.problems] == [
        f"{path}:1: chosen: undecodable text (not valid UTF-8)"
    ]


def test_a_line_that_is_not_json_is_reported(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")

    error = problems_of(path)

    assert f"{path}:2: row: not JSON" in str(error)


def test_duplicate_pair_ids_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])

    error = problems_of(path)

    assert f"{path}:2: id: duplicate of {path}:1" in str(error)


def test_a_file_without_a_rejected_column_is_one_problem(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["yes"]}), path)

    error = problems_of(path)

    assert [str(p) for p in error.problems] == [
        f"{path}: rejected: column missing (columns: prompt, chosen)"
    ]


def test_error_mode_lists_every_problem_not_just_the_first(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": ""}, GOOD, {**GOOD, "rejected": 5}, {"prompt": "p"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)

    error = problems_of(path)

    assert [str(p) for p in error.problems] == [
        f"{path}:2: chosen: empty response",
        f"{path}:4: rejected: expected a string like the rest of the file, got integer",
        f"{path}:5: chosen: missing",
        f"{path}:5: rejected: missing",
    ]
    assert str(error).startswith("4 problem(s) in the preference data:\n")


def test_skip_mode_loads_the_valid_rows_and_writes_the_rejected_ones(tmp_path):
    rows = [GOOD, {**GOOD, "rejected": GOOD["chosen"]}, GOOD, {**GOOD, "chosen": 1}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output = tmp_path / "run" / "pairs.parquet"

    result = load_pairs(path, on_bad_row="skip", rejected_path=rejected_path_for(output))

    assert result.table.column(schema.PAIR_ID).to_pylist() == ["pairs-1", "pairs-3"]
    assert (result.report.rows_read, result.report.rows_rejected) == (4, 2)
    assert result.rejected_path == tmp_path / "run" / "pairs.rejected.jsonl"
    written = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert [(line["row"], line["problems"][0]["field"]) for line in written] == [
        (2, "rejected"),
        (4, "chosen"),
    ]
    assert written[0]["problems"][0]["reason"] == "identical to chosen"
    assert written[1]["record"] == {**GOOD, "chosen": 1}


def test_skip_mode_with_no_valid_row_still_raises(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "chosen": ""}])

    error = problems_of(path, on_bad_row="skip")

    assert f"{path}:1: chosen: empty response" in str(error)


def test_an_unknown_bad_row_policy_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])

    with pytest.raises(ValueError, match="on_bad_row"):
        load_pairs(path, on_bad_row="drop")
