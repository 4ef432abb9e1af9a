"""Prompts for bootstrapping: loaded from JSONL/Parquet or taken from the offline pairs, and
tokenized exactly as the prompts of pairs are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sera_ray.data import schema
from sera_ray.data.tokenize import adds_bos, prompt_text

PROMPT_ID = "prompt_id"
PROMPT_MESSAGES = schema.PROMPT_MESSAGES

PROMPTS_SCHEMA = pa.schema(
    [
        pa.field(PROMPT_ID, pa.string()),
        pa.field(schema.PROMPT, pa.string()),
        pa.field(schema.PROMPT_IDS, pa.list_(pa.int32())),
    ]
)


def load_prompts(path: str | Path) -> pa.Table:
    """A table of `prompt_id`, `prompt` (and `prompt_messages` for chat prompts).

    Rows need a `prompt` (a string or a message list); `prompt_id` defaults to the row number.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ids, prompts, messages = [], [], []
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            messages.append(json.dumps(prompt))
            prompts.append("\n".join(str(m.get("content", "")) for m in prompt))
        elif isinstance(prompt, str) and prompt:
            messages.append(None)
            prompts.append(prompt)
        else:
            raise ValueError(f"{path}:{number}: prompt: missing or not a string / message list")
        ids.append(str(row.get("prompt_id", row.get("id", number - 1))))
    return pa.table(
        {PROMPT_ID: ids, schema.PROMPT: prompts, PROMPT_MESSAGES: pa.array(messages, pa.string())}
    )


def prompts_from_pairs(pairs: pa.Table) -> pa.Table:
    """The distinct prompts of tokenized pairs, first occurrence first."""
    seen: dict[tuple[int, ...], int] = {}
    for index, ids in enumerate(pairs.column(schema.PROMPT_IDS).to_pylist()):
        seen.setdefault(tuple(ids), index)
    rows = pairs.take(pa.array(list(seen.values()), pa.int64()))
    return pa.table(
        {
            PROMPT_ID: pc.cast(pa.array(range(rows.num_rows)), pa.string()),
            schema.PROMPT: rows.column(schema.PROMPT),
            schema.PROMPT_IDS: rows.column(schema.PROMPT_IDS),
        },
        schema=PROMPTS_SCHEMA,
    )


def tokenize_prompts(table: pa.Table, tokenizer: Any, *, max_prompt_length: int) -> pa.Table:
    """Token ids of each prompt (chat template when the tokenizer has one; left-truncated)."""
    messages = (
        table.column(PROMPT_MESSAGES).to_pylist()
        if PROMPT_MESSAGES in table.column_names
        else [None] * table.num_rows
    )
    texts = [
        prompt_text(tokenizer, prompt, message)
        for prompt, message in zip(table.column(schema.PROMPT).to_pylist(), messages)
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not tokenizer.chat_template and adds_bos(tokenizer):
        encoded = [[tokenizer.bos_token_id, *ids] for ids in encoded]
    encoded = [ids[-max_prompt_length:] for ids in encoded]
    return pa.table(
        {
            PROMPT_ID: table.column(PROMPT_ID),
            schema.PROMPT: table.column(schema.PROMPT),
            schema.PROMPT_IDS: pa.array(encoded, pa.list_(pa.int32())),
        },
        schema=PROMPTS_SCHEMA,
    )
