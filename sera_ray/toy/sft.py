"""Supervised fine-tuning and sampling for the toy world, in plain torch and transformers.

Building the toy world stands in for downloading a pretrained SFT model, so it runs in-process
with no Ray: a masked next-token loss on answer tokens, then `generate` to measure the result.
A prompt is tokenized as is (no BOS, no chat template); an answer is its text followed by EOS.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SftResult:
    """What one SFT run did: steps, tokens seen, wall time and the loss at the end."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float


@dataclass(frozen=True)
class Sample:
    """One sampled answer: its text without EOS, and whether the model emitted EOS."""

    prompt: str
    answer: str
    finished: bool


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + EOS, and labels that keep only the answer and EOS."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return prompt_ids + answer_ids, labels


def collate(tokenizer, examples: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (prompt, answer) examples into input ids, attention mask, labels."""
    encoded = [encode_example(tokenizer, prompt, answer) for prompt, answer in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_sft(
    model,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
) -> SftResult:
    """Train `model` in place on consecutive batches of `examples`, one step per batch.

    AdamW with linear warmup and a cosine decay to a tenth of the peak learning rate; the loss
    covers answer tokens and EOS only, so the model learns to answer, not to write prompts.
    """
    steps = len(examples) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    started = time.perf_counter()
    tokens = 0
    loss_value = float("nan")
    for step in range(steps):
        batch = collate(tokenizer, examples[step * batch_size : (step + 1) * batch_size])

        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()

        tokens += int(batch["attention_mask"].sum())
        loss_value = float(loss.detach())
        if step % 50 == 0:
            logger.debug("sft step %d/%d loss %.4f", step, steps, loss_value)
    model.eval()
    seconds = time.perf_counter() - started
    logger.info(
        "sft finished: %d steps, %d tokens, %.1f s, final loss %.4f",
        steps,
        tokens,
        seconds,
        loss_value,
    )
    return SftResult(steps=steps, tokens=tokens, seconds=seconds, final_loss=loss_value)


@torch.no_grad()
def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_prompts: int = 256,
) -> list[Sample]:
    """Sample `num_samples` answers per prompt with pure temperature sampling (no top-k/top-p).

    Prompts are batched by token length, so no prompt is padded. The result lists each prompt's
    samples together, in the order of `prompts`. Special tokens other than EOS are dropped from
    the answer text.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)

    results: list[Sample | None] = [None] * (len(prompts) * num_samples)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length in sorted(by_length):
            indices = by_length[length]
            for start in range(0, len(indices), batch_prompts):
                chunk = indices[start : start + batch_prompts]
                input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    num_return_sequences=num_samples,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for row, new_ids in enumerate(output[:, length:].tolist()):
                    index = chunk[row // num_samples]
                    finished = tokenizer.eos_token_id in new_ids
                    if finished:
                        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
                    # Limitation: a PAD or BOS sampled mid-answer vanishes from the text, so
                    # the gold reward never sees it; after SFT such tokens are vanishingly rare.
                    answer = tokenizer.decode(new_ids, skip_special_tokens=True)
                    results[index * num_samples + row % num_samples] = Sample(
                        prompt=prompts[index], answer=answer, finished=finished
                    )
    return [sample for sample in results if sample is not None]
