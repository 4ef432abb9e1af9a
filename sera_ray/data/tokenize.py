"""Pairs as token ids: the prompt as the policy sees it, and each response as its continuation.

With a chat template, the prompt is rendered from its messages (a plain prompt becomes one user
message) with the generation prompt appended; without one, it is the prompt text, after BOS
when the tokenizer is configured to add BOS. A response is tokenized as the continuation of the
rendered prompt and ends with EOS, so `prompt_ids + chosen_ids` is the tokenization of the whole
text followed by EOS. Where the whole text merges the response's first characters into the
prompt's last token (a prompt ending in a space, say), the response is tokenized on its own.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sera_ray.data import schema
from sera_ray.data.formats import PROMPT_MESSAGES

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = [
    schema.PAIR_ID,
    schema.SOURCE,
    schema.ITERATION,
    schema.PROMPT,
    schema.CHOSEN,
    schema.REJECTED,
]
BATCH_ROWS = 1024


@dataclass
class TokenizeStats:
    """How many pairs were tokenized and how many of them were cut to fit."""

    rows: int = 0
    truncated: int = 0  # pairs with the prompt or either response cut
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    # Responses whose tokens in the whole text do not start where the prompt's tokens end
    # (a merge across the boundary); these are tokenized on their own instead.
    boundary_mismatches: int = 0
    seconds: float = 0.0


def tokenize_pairs(
    table: pa.Table,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_length: int,
) -> tuple[pa.Table, TokenizeStats]:
    """Add prompt, chosen and rejected token ids to a normalised pair table.

    A prompt longer than `max_prompt_length` keeps its last tokens; a response is cut so that
    prompt and response together fit in `max_length` (a cut response has no EOS). The result has
    the columns of `schema.TOKENIZED_SCHEMA`, then every other input column unchanged.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"pair table lacks column(s) {', '.join(missing)}")
    for name in (schema.PROMPT, schema.CHOSEN, schema.REJECTED):
        if table.column(name).null_count:
            raise ValueError(f"pair table has {table.column(name).null_count} null {name}(s)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    started = time.perf_counter()
    stats = TokenizeStats(rows=table.num_rows)

    # A chat template writes its own BOS into the text when the model wants one.
    bos = None
    if not tokenizer.chat_template and adds_bos(tokenizer):
        bos = tokenizer.bos_token_id

    ids = {schema.PROMPT_IDS: [], schema.CHOSEN_IDS: [], schema.REJECTED_IDS: []}
    truncated = []
    for offset in range(0, table.num_rows, BATCH_ROWS):
        batch = table.slice(offset, BATCH_ROWS)
        prompts, chosen, rejected = _tokenize_batch(batch, tokenizer, bos, stats)
        for prompt_ids, chosen_ids, rejected_ids in zip(prompts, chosen, rejected):
            prompt_ids, chosen_ids, rejected_ids, cut = _truncate(
                prompt_ids, chosen_ids, rejected_ids, max_prompt_length, max_length, stats
            )
            ids[schema.PROMPT_IDS].append(prompt_ids)
            ids[schema.CHOSEN_IDS].append(chosen_ids)
            ids[schema.REJECTED_IDS].append(rejected_ids)
            truncated.append(cut)

    columns = {}
    for field in schema.TOKENIZED_SCHEMA:
        if field.name in ids:
            columns[field.name] = pa.array(ids[field.name], type=field.type)
        elif field.name == schema.TRUNCATED:
            columns[field.name] = pa.array(truncated, type=field.type)
        else:
            columns[field.name] = table.column(field.name).cast(field.type)
    result = pa.table(columns, schema=schema.TOKENIZED_SCHEMA)
    for name in table.column_names:
        if name not in result.column_names:
            result = result.append_column(table.schema.field(name), table.column(name))

    stats.seconds = time.perf_counter() - started
    if stats.boundary_mismatches:
        logger.warning(
            "%d response(s) merged with the prompt when tokenized as one text; "
            "they were tokenized on their own",
            stats.boundary_mismatches,
        )
    logger.info(
        "tokenized %d pairs (%d truncated) in %.2fs", stats.rows, stats.truncated, stats.seconds
    )
    return result, stats


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of what it encodes with special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def prompt_text(tokenizer: Any, prompt: str, prompt_messages: str | None) -> str:
    """The prompt as the tokenizer should see it: rendered by the chat template when it has one."""
    if not tokenizer.chat_template:
        return prompt
    if prompt_messages:
        messages = json.loads(prompt_messages)
    else:
        messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tokenize_batch(
    batch: pa.Table, tokenizer: Any, bos: int | None, stats: TokenizeStats
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids of a batch of pairs; `bos` goes in front of each prompt when it is not None."""
    prompts = batch.column(schema.PROMPT).to_pylist()
    if PROMPT_MESSAGES in batch.column_names:
        messages = batch.column(PROMPT_MESSAGES).to_pylist()
    else:
        messages = [None] * batch.num_rows
    pair_ids = batch.column(schema.PAIR_ID).to_pylist()

    texts = []
    for pair_id, prompt, prompt_messages in zip(pair_ids, prompts, messages):
        try:
            texts.append(prompt_text(tokenizer, prompt, prompt_messages))
        except Exception as error:
            raise ValueError(f"pair {pair_id}: the chat template failed: {error}") from error
    prompt_ids = _encode(tokenizer, texts)

    responses = []
    for name in (schema.CHOSEN, schema.REJECTED):
        texts_of_responses = batch.column(name).to_pylist()
        whole = _encode(tokenizer, [t + r for t, r in zip(texts, texts_of_responses)])
        ids, mismatched = [], []
        for index, (prompt_part, whole_ids) in enumerate(zip(prompt_ids, whole)):
            if whole_ids[: len(prompt_part)] != prompt_part:
                mismatched.append(index)
            ids.append(whole_ids[len(prompt_part) :])
        alone = _encode(tokenizer, [texts_of_responses[index] for index in mismatched])
        for index, alone_ids in zip(mismatched, alone):
            ids[index] = alone_ids
        stats.boundary_mismatches += len(mismatched)
        responses.append([response + [tokenizer.eos_token_id] for response in ids])

    if bos is not None:
        prompt_ids = [[bos, *ids] for ids in prompt_ids]
    return prompt_ids, responses[0], responses[1]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _truncate(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_prompt_length: int,
    max_length: int,
    stats: TokenizeStats,
) -> tuple[list[int], list[int], list[int], bool]:
    # Limitation: a left-truncated prompt loses its beginning, BOS and the chat template's
    # opening with it; the policy then sees a prompt that starts mid-text.
    prompt_cut = len(prompt_ids) > max_prompt_length
    if prompt_cut:
        prompt_ids = prompt_ids[-max_prompt_length:]
        stats.prompt_truncated += 1

    budget = max_length - len(prompt_ids)
    chosen_cut = len(chosen_ids) > budget
    rejected_cut = len(rejected_ids) > budget
    stats.chosen_truncated += chosen_cut
    stats.rejected_truncated += rejected_cut

    cut = prompt_cut or chosen_cut or rejected_cut
    stats.truncated += cut
    return prompt_ids, chosen_ids[:budget], rejected_ids[:budget], cut
