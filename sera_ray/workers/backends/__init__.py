"""Generator backends: one interface, chosen by name (`vllm`, `hf`, or `auto`).

A backend samples N responses per prompt from a causal LM, loads new weights without being
rebuilt, and computes the log-probs of fixed probe sequences so a weight sync can be verified.
Backends know nothing of Ray; the generator worker wraps one in an actor.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    """One sampled response: its token ids (EOS included when it ended) and whether it ended."""

    token_ids: list[int]
    finished: bool


class GeneratorBackend(ABC):
    """Samples responses; loads weights in place; scores probe sequences."""

    name: str = ""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """For each prompt (token ids), `sampling.n` completions, in prompt order."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights with these (Hugging Face parameter names)."""

    def load_weights_blob(self, blob: bytes) -> None:
        """Replace the weights from one safetensors blob (the object-store transport)."""
        from safetensors.torch import load

        self.load_weights(load(blob).items())

    @abstractmethod
    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        """Summed log-prob of tokens 1..L-1 of each sequence, each given its prefix."""

    def weights_checksum(self) -> str | None:
        """A checksum of the weights in the learner's layout, or None where layouts differ."""
        return None

    def close(self) -> None:
        """Release the engine's resources."""


_BACKENDS: dict[str, str] = {
    "hf": "sera_ray.workers.backends.hf:HFBackend",
    "vllm": "sera_ray.workers.backends.vllm:VLLMBackend",
}


def available_backends() -> list[str]:
    names = ["hf"]
    if importlib.util.find_spec("vllm") is not None:
        names.insert(0, "vllm")
    return names


def resolve_backend_name(name: str) -> str:
    """`auto` picks vLLM when it is installed, else transformers' generate."""
    if name == "auto":
        return available_backends()[0]
    if name not in _BACKENDS:
        raise ValueError(f"unknown generator backend {name!r}; choose from auto, {list(_BACKENDS)}")
    return name


def make_backend(name: str, model_path: str, **options) -> GeneratorBackend:
    module_name, class_name = _BACKENDS[resolve_backend_name(name)].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model_path, **options)
