"""Each format and container TRL users have loads to the same normalised pair table."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sera_ray.data import schema
from sera_ray.data.formats import NORMALISED_FIELDS, PROMPT_MESSAGES, implicit_prompt, load_pairs

NORMALISED_COLUMNS = [f.name for f in NORMALISED_FIELDS]
QUESTION = "What is 2+2?"
USER = {"role": "user", "content": QUESTION}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows, shards=2):
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it, made with pyarrow."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    size = -(-table.num_rows // shards)
    files = []
    for index in range(shards):
        name = f"data-{index:05d}-of-{shards:05d}.arrow"
        with pa.ipc.new_stream(str(path / name), table.schema) as writer:
            writer.write_table(table.slice(index * size, size))
        files.append({"filename": name})
    (path / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return path


def text_columns(table):
    columns = [schema.PROMPT, PROMPT_MESSAGES, schema.CHOSEN, schema.REJECTED]
    return table.select(columns).to_pylist()


def test_explicit_string_pairs_load_with_plain_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": QUESTION, "chosen": "It is 4.", "rejected": "It is 5."}],
    )

    table = load_pairs(path).table

    assert table.column_names == NORMALISED_COLUMNS
    assert table.to_pylist() == [
        {
            schema.PAIR_ID: "pairs-1",
            schema.PROMPT: QUESTION,
            PROMPT_MESSAGES: None,
            schema.CHOSEN: "It is 4.",
            schema.REJECTED: "It is 5.",
            schema.SOURCE: "offline",
            schema.ITERATION: 0,
        }
    ]
    assert table.schema.field(schema.ITERATION).type == pa.int32()


@pytest.mark.parametrize(
    "row",
    [
        # UltraFeedback-binarized: a string prompt, whole conversations as chosen and rejected.
        {
            "prompt": QUESTION,
            "chosen": [USER, {"role": "assistant", "content": "It is 4."}],
            "rejected": [USER, {"role": "assistant", "content": "It is 5."}],
        },
        # TRL conversational: the prompt as messages, the answers alone.
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": "It is 4."}],
            "rejected": [{"role": "assistant", "content": "It is 5."}],
        },
        # Implicit prompt as messages: the shared conversation before the answers.
        {
            "chosen": [USER, {"role": "assistant", "content": "It is 4."}],
            "rejected": [USER, {"role": "assistant", "content": "It is 5."}],
        },
    ],
    ids=["ultrafeedback", "trl-conversational", "implicit-messages"],
)
def test_chat_message_pairs_load_to_the_same_prompt_messages_and_answers(tmp_path, row):
    path = write_jsonl(tmp_path / "chat.jsonl", [row])

    table = load_pairs(path).table

    assert table.column_names == NORMALISED_COLUMNS
    assert text_columns(table) == [
        {
            schema.PROMPT: QUESTION,
            PROMPT_MESSAGES: json.dumps([USER]),
            schema.CHOSEN: "It is 4.",
            schema.REJECTED: "It is 5.",
        }
    ]


def test_implicit_prompt_pairs_split_at_the_last_assistant_marker(tmp_path):
    conversation = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant:"
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": conversation + " It is 4.", "rejected": conversation + " It is 5."}],
    )

    table = load_pairs(path).table

    assert text_columns(table) == [
        {
            schema.PROMPT: conversation,
            PROMPT_MESSAGES: None,
            schema.CHOSEN: " It is 4.",
            schema.REJECTED: " It is 5.",
        }
    ]


def test_implicit_prompt_without_a_marker_is_the_whole_common_prefix():
    prompt = implicit_prompt("The sky is blue", "The sky is green")

    assert prompt == "The sky is "


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ROWS = [
    {
        "id": id_,
        "prompt": question,
        "chosen": conversation(question, chosen),
        "rejected": conversation(question, rejected),
        "score_chosen": 9.0,
        "score_rejected": score_rejected,
    }
    for id_, question, chosen, rejected, score_rejected in [
        (7, QUESTION, "It is 4.", "It is 5.", 2.5),
        (8, "Name a colour.", "Blue.", "Seven.", 1.0),
        (9, "Say hi.", "Hi!", "No", 3.0),
    ]
]


@pytest.mark.parametrize(
    ("writer", "name"),
    [
        (write_jsonl, "pairs.jsonl"),
        (write_parquet, "pairs.parquet"),
        (write_saved_dataset, "pairs_dataset"),
    ],
    ids=["jsonl", "parquet", "saved-dataset"],
)
def test_every_container_loads_to_the_same_table(tmp_path, writer, name):
    path = writer(tmp_path / name, ROWS)

    result = load_pairs(path)

    assert result.table.column_names == [*NORMALISED_COLUMNS, "score_chosen", "score_rejected"]
    assert result.table.column(schema.PAIR_ID).to_pylist() == ["7", "8", "9"]
    assert result.table.column(schema.REJECTED).to_pylist() == ["It is 5.", "Seven.", "No"]
    assert result.table.column("score_rejected").to_pylist() == [2.5, 1.0, 3.0]
    assert result.report.rows_read == result.report.rows_valid == 3


def test_saved_dataset_dict_loads_the_requested_split(tmp_path):
    root = tmp_path / "dataset_dict"
    root.mkdir()
    write_saved_dataset(root / "train", ROWS[:2], shards=1)
    write_saved_dataset(root / "test", ROWS[2:], shards=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))

    train = load_pairs(root).table
    test = load_pairs(root, split="test").table

    assert train.column(schema.PAIR_ID).to_pylist() == ["7", "8"]
    assert test.column(schema.PAIR_ID).to_pylist() == ["9"]


def test_saved_dataset_written_by_the_datasets_library_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))

    table = load_pairs(path).table

    assert table.column(schema.CHOSEN).to_pylist() == ["It is 4.", "Blue.", "Hi!"]


def test_passthrough_columns_keep_their_values_and_types(tmp_path):
    rows = [
        {
            "prompt": QUESTION,
            "chosen": "It is 4.",
            "rejected": "It is 5.",
            "score": 3,
            "meta": {"annotator": "a"},
        }
    ]
    path = write_parquet(tmp_path / "scored.parquet", rows)

    table = load_pairs(path).table

    assert table.column("score").to_pylist() == [3]
    assert table.schema.field("score").type == pa.int64()
    assert table.column("meta").to_pylist() == [{"annotator": "a"}]


def test_a_passthrough_column_with_a_reserved_name_is_renamed(tmp_path):
    row = {"prompt": QUESTION, "chosen": "It is 4.", "rejected": "It is 5.", "source": "web"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])

    table = load_pairs(path).table

    assert table.column(schema.SOURCE).to_pylist() == ["offline"]
    assert table.column("input_source").to_pylist() == ["web"]


def test_a_directory_of_files_loads_every_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "yes", "rejected": "no"}])
    write_parquet(tmp_path / "b.parquet", [{"prompt": "q", "chosen": "up", "rejected": "down"}])

    table = load_pairs(tmp_path).table

    assert table.column(schema.PAIR_ID).to_pylist() == ["a-1", "b-0"]
    assert table.column(schema.CHOSEN).to_pylist() == ["yes", "up"]
