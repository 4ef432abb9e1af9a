"""Generator backend on transformers' `generate`, for machines without vLLM."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from transformers import AutoModelForCausalLM

from sera_ray.algo.logprobs import probe_logprobs
from sera_ray.workers.backends import Completion, GeneratorBackend, SamplingSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(model_path: str, dtype: str = "float32", device: str | None = None):
    """A Hugging Face causal LM in eval mode on `device` (CUDA when present, else CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _DTYPES["float32" if dtype == "auto" else dtype]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    return model.to(device).eval()


def load_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]):
    """Copy tensors into the model's parameters by name; every parameter must be given."""
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"received weight {name!r} that the model does not have")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            seen.add(name)
    missing = set(params) - seen
    if missing:
        raise KeyError(
            f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[0]}"
        )


class HFBackend(GeneratorBackend):
    """Batched sampling with left padding; weights are the model's own parameters."""

    name = "hf"

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, **_options):
        self.model = load_causal_lm(model_path, dtype)
        self.device = next(self.model.parameters()).device
        config = self.model.generation_config
        eos = (
            config.eos_token_id
            if config.eos_token_id is not None
            else self.model.config.eos_token_id
        )
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_token_id = min(self.eos_ids)
        pad = self.model.config.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.seed = seed

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        torch.manual_seed(sampling.seed)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1

        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_token_id,
        )
        new_tokens = output[:, width:].tolist()

        completions: list[list[Completion]] = []
        for row in range(len(prompts)):
            group = []
            for tokens in new_tokens[row * sampling.n : (row + 1) * sampling.n]:
                end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
                if end is None:
                    group.append(Completion(token_ids=tokens, finished=False))
                else:
                    group.append(Completion(token_ids=tokens[: end + 1], finished=True))
            completions.append(group)
        return completions

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_tensors(self.model, named_tensors)

    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        return probe_logprobs(self.model, sequences)

    def weights_checksum(self) -> str | None:
        from sera_ray.sync.checksum import weights_checksum

        return weights_checksum(self.model.named_parameters())
