"""Pairs become token ids: the prompt as the policy sees it, each response as its continuation."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from sera_ray.data import schema
from sera_ray.data.formats import PROMPT_MESSAGES, load_pairs
from sera_ray.data.tokenize import tokenize_pairs
from sera_ray.tiny import build_tokenizer

HH_PROMPT = "\n\nHuman: Sort the digits: 3 1 2\n\nAssistant:"
QUESTION = "Hello! How are you today?"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def hh_pairs(tmp_path):
    row = {"chosen": HH_PROMPT + " 1 2 3.", "rejected": HH_PROMPT + " 3 1 2.", "score": 0.5}
    return load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row])).table


@pytest.fixture
def chat_pairs(tmp_path):
    user = {"role": "user", "content": QUESTION}
    row = {
        "prompt": QUESTION,
        "chosen": [user, {"role": "assistant", "content": "I am fine, thank you."}],
        "rejected": [user, {"role": "assistant", "content": "Wrong."}],
    }
    return load_pairs(write_jsonl(tmp_path / "chat.jsonl", [row])).table


def test_without_a_chat_template_prompt_and_response_concatenate_to_the_whole_text(
    plain_tokenizer, hh_pairs
):
    table, stats = tokenize_pairs(hh_pairs, plain_tokenizer, max_prompt_length=64, max_length=128)

    row = table.to_pylist()[0]
    eos = plain_tokenizer.eos_token_id
    assert row[schema.PROMPT_IDS] == ids(plain_tokenizer, HH_PROMPT)
    assert row[schema.PROMPT_IDS] + row[schema.CHOSEN_IDS] == [
        *ids(plain_tokenizer, HH_PROMPT + " 1 2 3."),
        eos,
    ]
    assert row[schema.PROMPT_IDS] + row[schema.REJECTED_IDS] == [
        *ids(plain_tokenizer, HH_PROMPT + " 3 1 2."),
        eos,
    ]
    assert (row[schema.TRUNCATED], stats.truncated, stats.boundary_mismatches) == (False, 0, 0)


def test_with_a_chat_template_the_prompt_is_rendered_with_the_generation_prompt(
    tokenizer, chat_pairs
):
    messages = json.loads(chat_pairs.column(PROMPT_MESSAGES)[0].as_py())
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "I am fine, thank you."}], tokenize=False
    )

    table, _ = tokenize_pairs(chat_pairs, tokenizer, max_prompt_length=64, max_length=128)

    row = table.to_pylist()[0]
    assert rendered.endswith("<|assistant|>") and QUESTION in rendered
    assert row[schema.PROMPT_IDS] == ids(tokenizer, rendered)
    assert row[schema.PROMPT_IDS] + row[schema.CHOSEN_IDS] == [
        *ids(tokenizer, whole),
        tokenizer.eos_token_id,
    ]


def test_a_plain_prompt_goes_through_the_chat_template_as_one_user_message(tokenizer, hh_pairs):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": HH_PROMPT}], tokenize=False, add_generation_prompt=True
    )

    table, _ = tokenize_pairs(hh_pairs, tokenizer, max_prompt_length=64, max_length=128)

    assert table.column(schema.PROMPT_IDS)[0].as_py() == ids(tokenizer, rendered)


def test_bos_comes_before_the_prompt_only_when_the_tokenizer_adds_it(plain_tokenizer, hh_pairs):
    bos_tokenizer = build_tokenizer([HH_PROMPT, "1 2 3."] * 20, vocab_size=300)
    bos_tokenizer.add_bos_token = True

    with_bos, _ = tokenize_pairs(hh_pairs, bos_tokenizer, max_prompt_length=64, max_length=128)
    without, _ = tokenize_pairs(hh_pairs, plain_tokenizer, max_prompt_length=64, max_length=128)

    bos = bos_tokenizer.bos_token_id
    assert with_bos.column(schema.PROMPT_IDS)[0].as_py()[0] == bos
    assert bos not in with_bos.column(schema.CHOSEN_IDS)[0].as_py()
    assert plain_tokenizer.bos_token_id not in without.column(schema.PROMPT_IDS)[0].as_py()


def test_the_output_has_the_tokenized_schema_then_the_passthrough_columns(
    plain_tokenizer, hh_pairs
):
    table, _ = tokenize_pairs(hh_pairs, plain_tokenizer, max_prompt_length=64, max_length=128)

    names = schema.TOKENIZED_SCHEMA.names
    assert table.schema.names == [*names, PROMPT_MESSAGES, "score"]
    assert table.select(names).schema == schema.TOKENIZED_SCHEMA
    assert table.column("score").to_pylist() == [0.5]


def test_a_response_that_merges_with_the_prompt_is_tokenized_on_its_own(plain_tokenizer):
    pairs = pa.table(
        {
            schema.PAIR_ID: ["space"],
            schema.SOURCE: ["offline"],
            schema.ITERATION: pa.array([0], type=pa.int32()),
            schema.PROMPT: ["Sort the digits: "],
            schema.CHOSEN: ["1 2 3"],
            schema.REJECTED: ["3 1 2"],
        }
    )

    table, stats = tokenize_pairs(pairs, plain_tokenizer, max_prompt_length=64, max_length=128)

    eos = plain_tokenizer.eos_token_id
    assert table.column(schema.CHOSEN_IDS)[0].as_py() == [*ids(plain_tokenizer, "1 2 3"), eos]
    assert stats.boundary_mismatches == 2


def test_long_prompts_keep_their_last_tokens_and_long_responses_lose_their_eos(plain_tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    pairs = pa.table(
        {
            schema.PAIR_ID: ["long-prompt", "long-answer", "short"],
            schema.SOURCE: ["offline"] * 3,
            schema.ITERATION: pa.array([0, 0, 0], type=pa.int32()),
            schema.PROMPT: [prompt, "Hi.", "Hi."],
            schema.CHOSEN: [" Yes.", " Hello! How are you today? I am fine, thank you.", " Hi."],
            schema.REJECTED: [" No.", " No.", " Go."],
        }
    )
    full, _ = tokenize_pairs(pairs, plain_tokenizer, max_prompt_length=200, max_length=400)

    table, stats = tokenize_pairs(pairs, plain_tokenizer, max_prompt_length=8, max_length=16)

    rows, untouched = table.to_pylist(), full.to_pylist()
    assert rows[0][schema.PROMPT_IDS] == untouched[0][schema.PROMPT_IDS][-8:]
    assert len(rows[1][schema.PROMPT_IDS]) + len(rows[1][schema.CHOSEN_IDS]) == 16
    assert rows[1][schema.CHOSEN_IDS][-1] != plain_tokenizer.eos_token_id
    assert rows[1][schema.REJECTED_IDS][-1] == plain_tokenizer.eos_token_id
    assert [row[schema.TRUNCATED] for row in rows] == [True, True, False]
    assert (stats.rows, stats.truncated, stats.prompt_truncated) == (3, 2, 1)
    assert (stats.chosen_truncated, stats.rejected_truncated) == (1, 0)


def test_lengths_that_leave_no_room_for_a_response_are_refused(plain_tokenizer, hh_pairs):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pairs(hh_pairs, plain_tokenizer, max_prompt_length=64, max_length=64)
