"""The generator worker on its vLLM backend, driven the way the driver drives it.

Each transport gets one `GeneratorWorker` actor (one vLLM engine) and one sender actor that plays
learner rank 0 with other weights. The worker joins the sync with `join_weight_sync`, takes it
with `receive_weights`, and is then checked as the driver checks it: probe log-probs against
transformers, and `weights_checksum`. Run with `make test-vllm`; add
`-o log_cli=true --log-cli-level=INFO` to see engine starts and sync timings.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pytest
import ray
import torch

from sera_ray.algo.logprobs import probe_logprobs
from sera_ray.sync import WeightSyncError, compare_probe_logprobs, free_port, make_transport
from sera_ray.sync import probe_sequences as make_probe_sequences
from sera_ray.workers.generator import CANDIDATES_SCHEMA, GeneratorWorker

pytestmark = pytest.mark.vllm

logger = logging.getLogger(__name__)

PROMPTS = [[1, 40, 41, 42, 43], [1, 100, 7, 250], [1, 60]]
SAMPLING = {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 96, "seed": 11}
TOLERANCE = 1e-5
TRANSPORT_OPTIONS = {"object_store": {}, "collective": {"bucket_mb": 0.5}}


@ray.remote(num_cpus=0.5)
class WeightSender:
    """Plays learner rank 0: holds a state dict and sends it through a real transport."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict
        self.transport = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join_weight_sync(self, transport: str, options: dict, group: dict | None = None) -> None:
        self.transport = make_transport(transport, **options)
        if group is not None:
            self.transport.init_group(**group)

    def send_weights(self):
        return self.transport.send_weights(iter(self.state_dict.items()))


@pytest.fixture(scope="module")
def new_model(tokenizer):
    """Other weights for the same architecture: a differently seeded tiny Llama."""
    from sera_ray.tiny import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=7)


@pytest.fixture(scope="module")
def probes(tokenizer):
    return make_probe_sequences(len(tokenizer), special_ids=tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> pa.Table:
    return pa.table(
        {
            "prompt_id": [f"p{index}" for index in range(len(PROMPTS))],
            "prompt": [tokenizer.decode(ids) for ids in PROMPTS],
            "prompt_ids": pa.array(PROMPTS, type=pa.list_(pa.int32())),
        }
    )


class Lane:
    """A vLLM generator worker and a sender joined to one transport, as the driver joins them."""

    def __init__(self, transport: str, model_dir, new_state_dict: dict[str, torch.Tensor]):
        self.transport = transport
        options = TRANSPORT_OPTIONS[transport]

        start = time.perf_counter()
        self.worker = ray.remote(num_cpus=1)(GeneratorWorker).remote(
            str(model_dir),
            backend="vllm",
            dtype="float32",
            seed=0,
            backend_options={"max_model_len": 256},
            name=f"vllm generator ({transport})",
        )
        self.sender = WeightSender.remote(new_state_dict)
        if transport == "collective":
            addr, port = ray.get(self.sender.address.remote())
            group = {"master_addr": addr, "master_port": port, "world_size": 2, "backend": "gloo"}
            calls = [
                self.sender.join_weight_sync.remote(transport, options, {**group, "rank": 0}),
                self.worker.join_weight_sync.remote(transport, options, {**group, "rank": 1}),
            ]
        else:
            calls = [
                self.sender.join_weight_sync.remote(transport, options),
                self.worker.join_weight_sync.remote(transport, options),
            ]
        ray.get(calls)
        logger.info(
            "%s lane: worker started and joined in %.1f s", transport, time.perf_counter() - start
        )

    def sync(self):
        """One sync as `SeraDriver._sync_weights` runs it; returns what the sender sent."""
        if self.transport == "collective":
            received = self.worker.receive_weights.remote(None)
            sent = ray.get(self.sender.send_weights.remote())
            ray.get(received)
        else:
            sent = ray.get(self.sender.send_weights.remote())
            ray.get(self.worker.receive_weights.remote(sent.payload))
        return sent

    def close(self) -> None:
        ray.get(self.worker.shutdown.remote())
        ray.kill(self.worker)
        ray.kill(self.sender)


@pytest.fixture(scope="module", params=["object_store", "collective"])
def lane(request, ray_cluster, tiny_model_dir, new_model):
    lane = Lane(request.param, tiny_model_dir, new_model.state_dict())
    yield lane
    lane.close()


def test_generate_returns_n_candidates_per_prompt_finished_exactly_when_they_end_in_eos(
    lane, prompts, tokenizer
):
    eos = tokenizer.eos_token_id

    candidates = ray.get(lane.worker.generate.remote(prompts, SAMPLING, 2))

    assert candidates.schema == CANDIDATES_SCHEMA
    n = SAMPLING["n"]
    assert candidates.column("prompt_id").to_pylist() == [
        prompt_id for prompt_id in prompts.column("prompt_id").to_pylist() for _ in range(n)
    ]
    assert candidates.column("prompt_ids").to_pylist() == [ids for ids in PROMPTS for _ in range(n)]
    assert set(candidates.column("candidate_source").to_pylist()) == {"policy"}
    rows = candidates.to_pylist()
    for row in rows:
        response_ids = row["response_ids"]
        assert row["finished"] == (response_ids[-1] == eos)
        assert eos not in response_ids[:-1]
        assert row["response_len"] == len(response_ids)
        assert row["response"] == tokenizer.decode(response_ids, skip_special_tokens=True)
        if not row["finished"]:
            assert len(response_ids) == SAMPLING["max_new_tokens"]
    assert {row["finished"] for row in rows} == {True, False}


def test_sync_moves_probes_and_samples_to_the_new_weights_without_a_checksum(
    lane, prompts, new_model, probes
):
    expected = probe_logprobs(new_model, probes)
    probes_before = ray.get(lane.worker.probe_logprobs.remote(probes))
    samples_before = ray.get(lane.worker.generate.remote(prompts, SAMPLING))

    start = time.perf_counter()
    sent = lane.sync()
    seconds = time.perf_counter() - start

    probes_after = ray.get(lane.worker.probe_logprobs.remote(probes))
    samples_after = ray.get(lane.worker.generate.remote(prompts, SAMPLING))
    with pytest.raises(WeightSyncError, match="before the sync"):
        compare_probe_logprobs(
            expected, probes_before, tolerance=1e-3, receiver="generator before the sync"
        )
    max_diff = compare_probe_logprobs(
        expected, probes_after, tolerance=TOLERANCE, receiver="generator"
    )
    assert ray.get(lane.worker.weights_checksum.remote()) is None
    response_ids_before = samples_before.column("response_ids").to_pylist()
    assert samples_after.column("response_ids").to_pylist() != response_ids_before
    assert sent.num_tensors == len(new_model.state_dict())
    logger.info(
        "%s sync of %d tensors in %d buckets: %.3f s, probe max diff %.2e",
        lane.transport,
        sent.num_tensors,
        sent.num_buckets,
        seconds,
        max_diff,
    )
