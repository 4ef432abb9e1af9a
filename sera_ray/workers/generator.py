"""Generator worker: samples N responses per prompt with a backend (vLLM or transformers)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import torch
from transformers import AutoTokenizer

from sera_ray.algo.bootstrap import SAMPLED_SCHEMA
from sera_ray.sync.base import make_transport
from sera_ray.workers.backends import SamplingSettings, make_backend, resolve_backend_name
from sera_ray.workers.receiver import WeightReceiver

logger = logging.getLogger(__name__)

CANDIDATES_SCHEMA = SAMPLED_SCHEMA


class GeneratorWorker(WeightReceiver):
    """A Ray actor around one generator backend.

    `weights` names what the worker's model is: "policy" workers receive every sync,
    "reference" workers keep the reference weights for the whole run.
    """

    def __init__(
        self,
        model_path: str,
        *,
        backend: str = "auto",
        weights: str = "policy",
        dtype: str = "float32",
        seed: int = 0,
        backend_options: dict[str, Any] | None = None,
        name: str = "generator",
    ):
        self.receiver_name = name
        self.weights = weights
        self.backend_name = resolve_backend_name(backend)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.backend = make_backend(
            self.backend_name, model_path, dtype=dtype, seed=seed, **(backend_options or {})
        )
        logger.info("%s ready (%s backend, %s weights)", name, self.backend_name, weights)

    def generate(
        self, prompts: pa.Table, sampling: dict[str, Any], batch_size: int = 64
    ) -> pa.Table:
        """Sample `sampling["n"]` responses for each row of `prompts` (prompt_id, prompt,
        prompt_ids); one output row per response, with whether it ended with EOS."""
        settings = SamplingSettings(**sampling)
        start = time.perf_counter()
        prompt_ids = prompts.column("prompt_ids").to_pylist()
        rows: dict[str, list] = {field.name: [] for field in CANDIDATES_SCHEMA}
        for first in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[first : first + batch_size]
            seeded = SamplingSettings(**{**sampling, "seed": settings.seed + first})
            groups = self.backend.generate(batch, seeded)
            for offset, group in enumerate(groups):
                index = first + offset
                for completion in group:
                    rows["prompt_id"].append(prompts.column("prompt_id")[index].as_py())
                    rows["prompt"].append(prompts.column("prompt")[index].as_py())
                    rows["prompt_ids"].append(batch[offset])
                    rows["response"].append(
                        self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                    )
                    rows["response_ids"].append(completion.token_ids)
                    rows["finished"].append(completion.finished)
                    rows["response_len"].append(len(completion.token_ids))
                    rows["candidate_source"].append(self.weights)
        table = pa.Table.from_pydict(rows, schema=CANDIDATES_SCHEMA)
        logger.debug(
            "%s sampled %d responses in %.2fs",
            self.receiver_name,
            table.num_rows,
            time.perf_counter() - start,
        )
        return table

    def receive_weights(self, payload: Any = None) -> dict[str, float]:
        """vLLM takes the object-store blob whole and joins collectives in its own worker."""
        if self.backend_name != "vllm":
            return super().receive_weights(payload)
        start = time.perf_counter()
        if self._transport.concurrent:
            self.backend.receive_weights_collective()
        else:
            blob = (
                payload
                if isinstance(payload, bytes | bytearray | memoryview)
                else self._blob(payload)
            )
            self.backend.load_weights_blob(bytes(blob))
        return {"seconds": time.perf_counter() - start}

    def join_weight_sync(self, transport, options, group=None) -> None:
        if self.backend_name != "vllm" or group is None:
            super().join_weight_sync(transport, options, group)
            return
        self._transport = make_transport(transport, **options)
        self.backend.join_weight_group(**group)

    @staticmethod
    def _blob(payload: Any) -> bytes:
        import ray

        return ray.get(payload)

    def _load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.backend.load_weights(named_tensors)

    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        return self.backend.probe_logprobs(sequences)

    def weights_checksum(self) -> str | None:
        return self.backend.weights_checksum()

    def shutdown(self) -> None:
        self.backend.close()
