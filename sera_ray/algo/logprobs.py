"""Sequence log-probs of responses under a causal LM.

The LM head runs on response positions only and the log-softmax is taken a chunk of positions
at a time, so memory stays near the size of the response logits rather than a full-vocabulary
float32 log-softmax over every position of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """Right-padded prompt+response sequences and a mask of the response tokens."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length]
    response_mask: torch.Tensor  # [batch, length], True where the token belongs to the response


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Concatenate each prompt with its response and right-pad them into one batch."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    response_mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        start, end = len(prompt), len(prompt) + len(response)
        input_ids[row, :start] = torch.as_tensor(list(prompt), dtype=torch.long)
        input_ids[row, start:end] = torch.as_tensor(list(response), dtype=torch.long)
        attention_mask[row, :end] = 1
        response_mask[row, start:end] = True
    return PackedBatch(input_ids.to(device), attention_mask.to(device), response_mask.to(device))


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states out) and the LM head of a causal LM."""
    head = model.get_output_embeddings()
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or body is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder / output embeddings")
    return body, head


def response_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    chunk_size: int = 1024,
    sum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each sequence, and the response token count.

    Position i predicts token i+1, so the hidden state before each response token is the one
    sent through the LM head. Gradients flow when the caller has them enabled. `sum_dtype`
    (e.g. float64) sums the per-token log-probs more precisely than the logits' dtype.
    """
    body, head = _decoder_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]

    # The hidden state at position i scores token i+1: shift the response mask left by one.
    targets_mask = batch.response_mask[:, 1:]
    rows, cols = targets_mask.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]
    targets = batch.input_ids[:, 1:][rows, cols]

    token_logps = []
    for start in range(0, states.shape[0], chunk_size):
        logits = head(states[start : start + chunk_size]).float()
        chunk_targets = targets[start : start + chunk_size]
        picked = logits.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(logits, dim=-1))
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0)
    if sum_dtype is not None:
        flat = flat.to(sum_dtype)

    batch_size = batch.input_ids.shape[0]
    sums = torch.zeros(batch_size, dtype=flat.dtype, device=flat.device).index_add(0, rows, flat)
    counts = targets_mask.sum(dim=1)
    return sums, counts


def pair_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs in one concatenated forward.

    Returns (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [pairs].
    """
    pairs = len(prompt_ids)
    device = next(model.parameters()).device
    batch = pack_sequences(
        list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_token_id, device
    )
    sums, counts = response_logprobs(model, batch, chunk_size)
    return sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:]


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    max_tokens_per_batch: int = 8192,
    chunk_size: int = 1024,
) -> tuple[list[float], list[int]]:
    """Response log-probs of many sequences, batched by length to waste little on padding.

    Sequences are sorted by length and packed into batches of at most `max_tokens_per_batch`
    padded tokens; results come back in the input order. Sums are taken in float64: a float32
    sum of ~24 token log-probs drifts by about 1e-5, the tolerance of a weight-sync probe.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    logps = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    device = next(model.parameters()).device

    batch_rows: list[int] = []
    for position, index in enumerate(order):
        batch_rows.append(index)
        width = len(prompts[index]) + len(responses[index])  # the longest so far (sorted)
        next_width = (
            len(prompts[order[position + 1]]) + len(responses[order[position + 1]])
            if position + 1 < len(order)
            else None
        )
        full = next_width is None or next_width * (len(batch_rows) + 1) > max_tokens_per_batch
        if not full and width > 0:
            continue
        batch = pack_sequences(
            [prompts[i] for i in batch_rows],
            [responses[i] for i in batch_rows],
            pad_token_id,
            device,
        )
        sums, lengths = response_logprobs(model, batch, chunk_size, sum_dtype=torch.float64)
        for row, i in enumerate(batch_rows):
            logps[i] = float(sums[row])
            counts[i] = int(lengths[row])
        batch_rows = []
    return logps, counts


def probe_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> list[float]:
    """Summed log-prob of tokens 1..L-1 of each probe sequence (token 0 is the only prompt)."""
    prompts = [seq[:1] for seq in sequences]
    responses = [seq[1:] for seq in sequences]
    was_training = model.training
    model.eval()
    logps, _ = sequence_logprobs(model, prompts, responses, pad_token_id=0)
    model.train(was_training)
    return logps
