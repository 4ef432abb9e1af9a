"""Scorer worker: sequence log-probs of pairs and of sampled responses under one model.

A "reference" scorer keeps the frozen reference; a "policy" scorer receives every weight sync
and, when the iteration ensemble needs it, keeps the weights of the policy before the last
sync as well, so one pass yields both the current and the previous policy's log-probs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable

import pyarrow as pa
import torch

from sera_ray.algo.logprobs import probe_logprobs, sequence_logprobs
from sera_ray.data import schema as S
from sera_ray.workers.backends.hf import load_causal_lm, load_named_tensors
from sera_ray.workers.receiver import WeightReceiver

logger = logging.getLogger(__name__)

_PREFIX = {"reference": "ref", "policy": "policy"}


def _set_column(table: pa.Table, name: str, values, type_: pa.DataType) -> pa.Table:
    array = pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


class ScorerWorker(WeightReceiver):
    def __init__(
        self,
        model_path: str,
        *,
        role: str,
        keep_previous: bool = False,
        dtype: str = "float32",
        max_tokens_per_batch: int = 8192,
        chunk_size: int = 1024,
        name: str = "scorer",
    ):
        if role not in _PREFIX:
            raise ValueError(f"scorer role must be 'reference' or 'policy', not {role!r}")
        self.role = role
        self.receiver_name = name
        self.model = load_causal_lm(model_path, dtype)
        self.previous = copy.deepcopy(self.model) if keep_previous else None
        self.pad_token_id = self.model.config.pad_token_id or 0
        self.max_tokens_per_batch = max_tokens_per_batch
        self.chunk_size = chunk_size
        logger.info("%s ready (%s model from %s)", name, role, model_path)

    def _logps(self, model, prompts, responses) -> tuple[list[float], list[int]]:
        return sequence_logprobs(
            model,
            prompts,
            responses,
            self.pad_token_id,
            max_tokens_per_batch=self.max_tokens_per_batch,
            chunk_size=self.chunk_size,
        )

    def score_pairs(self, pairs: pa.Table) -> pa.Table:
        """Add `<role>_chosen_logp`, `<role>_rejected_logp` and the response lengths."""
        start = time.perf_counter()
        prompts = pairs.column(S.PROMPT_IDS).to_pylist()
        chosen = pairs.column(S.CHOSEN_IDS).to_pylist()
        rejected = pairs.column(S.REJECTED_IDS).to_pylist()
        models = {_PREFIX[self.role]: self.model}
        if self.previous is not None:
            models["previous"] = self.previous

        # One length-batched pass over chosen and rejected together.
        for prefix, model in models.items():
            logps, counts = self._logps(model, prompts + prompts, chosen + rejected)
            n = len(prompts)
            pairs = _set_column(pairs, f"{prefix}_chosen_logp", logps[:n], pa.float64())
            pairs = _set_column(pairs, f"{prefix}_rejected_logp", logps[n:], pa.float64())
        pairs = _set_column(pairs, S.CHOSEN_LEN, counts[:n], pa.int32())
        pairs = _set_column(pairs, S.REJECTED_LEN, counts[n:], pa.int32())
        logger.debug(
            "%s scored %d pairs in %.2fs", self.receiver_name, n, time.perf_counter() - start
        )
        return pairs

    def score_responses(self, candidates: pa.Table) -> pa.Table:
        """Add `<role>_logp` (and `previous_logp`) to sampled responses."""
        prompts = candidates.column("prompt_ids").to_pylist()
        responses = candidates.column("response_ids").to_pylist()
        models = {_PREFIX[self.role]: self.model}
        if self.previous is not None:
            models["previous"] = self.previous
        for prefix, model in models.items():
            logps, _ = self._logps(model, prompts, responses)
            candidates = _set_column(candidates, f"{prefix}_logp", logps, pa.float64())
        return candidates

    def _load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.role == "reference":
            raise RuntimeError(f"{self.receiver_name} holds the frozen reference; it takes no sync")
        if self.previous is not None:
            self.previous.load_state_dict(self.model.state_dict())
        load_named_tensors(self.model, named_tensors)

    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        return probe_logprobs(self.model, sequences)

    def weights_checksum(self) -> str:
        from sera_ray.sync.checksum import weights_checksum

        return weights_checksum(self.model.named_parameters())
