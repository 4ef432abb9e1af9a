"""Weight sync between real Ray actors: the object store and a Gloo weight group."""

from __future__ import annotations

import pytest
import ray
import torch

from sera_ray.sync import (
    WeightSyncError,
    available_transports,
    compare_probe_logprobs,
    free_port,
    make_transport,
    probe_sequences,
    weights_checksum,
)

# Tensors of other dtypes than the tiny model's float32, sent along with it.
EXTRA_TENSORS = {
    "extra.half": torch.linspace(-2, 2, 3000, dtype=torch.float16).reshape(30, 100),
    "extra.bfloat": torch.linspace(-1, 1, 5000, dtype=torch.bfloat16),
    "extra.steps": torch.arange(1000, dtype=torch.int64).reshape(10, 100),
    "extra.mask": torch.arange(77) % 3 == 0,
    "extra.scalar": torch.tensor(0.5, dtype=torch.float64),
}


@ray.remote(num_cpus=0.5)
class ModelHolder:
    """A tiny Llama in an actor: sends its weights, or receives and loads someone else's."""

    def __init__(self, config):
        self.config = config
        self.model = None
        self.transport = None
        self.received_extras: dict[str, torch.Tensor] = {}

    def reset(self, seed: int) -> None:
        """Fresh random weights from `seed`, so each test starts from models that disagree."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(self.config).float().eval()
        self.received_extras = {}

    def checksum(self) -> str:
        return weights_checksum(self.model.state_dict().items())

    @torch.no_grad()
    def probe_logprobs(self, sequences: list[list[int]]) -> list[float]:
        input_ids = torch.tensor(sequences)
        logprobs = torch.log_softmax(self.model(input_ids).logits[:, :-1].float(), dim=-1)
        targets = input_ids[:, 1:].unsqueeze(-1)
        return logprobs.gather(-1, targets).squeeze(-1).sum(-1).tolist()

    def join_default_group(self, port: int) -> None:
        """Hold torch.distributed's default group, as a DeepSpeed learner rank does."""
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )

    def default_group_still_works(self) -> bool:
        value = torch.ones(1)
        torch.distributed.all_reduce(value)
        return torch.distributed.get_world_size() == 1 and value.item() == 1.0

    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def init_group(self, addr: str, port: int, rank: int, world_size: int, bucket_mb: float):
        self.transport = make_transport("collective", bucket_mb=bucket_mb)
        self.transport.init_group(addr, port, rank, world_size, backend="gloo", timeout_s=60)

    def send(self, transport_name: str, with_extras: bool = False):
        transport = self._transport(transport_name)
        tensors = list(self.model.state_dict().items())
        if with_extras:
            tensors += list(EXTRA_TENSORS.items())
        return transport.send_weights(iter(tensors))

    def receive(self, transport_name: str, payload=None) -> list[tuple[str, str, list[int]]]:
        transport = self._transport(transport_name)
        weights, layout = {}, []
        for name, tensor in transport.receive_weights(payload):
            layout.append((name, str(tensor.dtype), list(tensor.shape)))
            if name in EXTRA_TENSORS:
                self.received_extras[name] = tensor.clone()
            else:
                weights[name] = tensor
        self.model.load_state_dict(weights)
        return layout

    def extras_checksum(self) -> str:
        return weights_checksum(self.received_extras.items())

    def _transport(self, name: str):
        return self.transport if name == "collective" else make_transport(name)


@pytest.fixture(scope="module")
def holders(ray_cluster, tiny_model):
    """Three model holders, started once: actor start-up is most of this module's time."""
    return [ModelHolder.remote(tiny_model.config) for _ in range(3)]


def reset_weights(holders, seeds) -> None:
    ray.get([holder.reset.remote(seed) for holder, seed in zip(holders, seeds)])


@pytest.fixture(scope="module")
def probes(tokenizer):
    return probe_sequences(len(tokenizer), special_ids=tokenizer.all_special_ids)


def test_both_transports_are_registered_by_name():
    assert available_transports() == ["collective", "object_store"]
    with pytest.raises(ValueError, match="unknown weight transport 'carrier_pigeon'"):
        make_transport("carrier_pigeon")


def test_object_store_sync_makes_receiver_match_sender(holders, tiny_model, probes):
    sender, receiver = holders[:2]
    reset_weights([sender, receiver], seeds=(0, 1))
    before = ray.get([sender.checksum.remote(), receiver.checksum.remote()])
    assert before[0] != before[1]

    sent = ray.get(sender.send.remote("object_store"))
    ray.get(receiver.receive.remote("object_store", sent.payload))

    sender_probes, receiver_probes = ray.get(
        [sender.probe_logprobs.remote(probes), receiver.probe_logprobs.remote(probes)]
    )
    assert ray.get(receiver.checksum.remote()) == sent.checksum == before[0]
    assert sent.num_tensors == len(tiny_model.state_dict())
    assert sent.num_bytes > sum(t.numel() * 4 for t in tiny_model.state_dict().values())
    assert sent.seconds > 0
    max_diff = compare_probe_logprobs(
        sender_probes, receiver_probes, tolerance=1e-6, receiver="receiver"
    )
    assert max_diff <= 1e-6


def test_collective_sync_broadcasts_mixed_dtypes_in_buckets_to_two_receivers(
    holders, tiny_model, probes
):
    sender, *receivers = holders
    reset_weights(holders, seeds=(0, 1, 2))
    checksums_before = ray.get([holder.checksum.remote() for holder in holders])
    assert len(set(checksums_before)) == 3
    ray.get(sender.join_default_group.remote(port=free_port()))
    addr, port = ray.get(sender.master_address.remote())
    ray.get(
        [
            member.init_group.remote(addr, port, rank, 3, bucket_mb=0.25)
            for rank, member in enumerate([sender, *receivers])
        ]
    )

    # A collective: every receiver is waiting in the broadcast before the sender starts.
    layouts = [receiver.receive.remote("collective") for receiver in receivers]
    sent = ray.get(sender.send.remote("collective", with_extras=True))
    layouts = ray.get(layouts)

    model_bytes = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    extra_bytes = sum(t.numel() * t.element_size() for t in EXTRA_TENSORS.values())
    assert sent.num_bytes == model_bytes + extra_bytes
    assert sent.num_tensors == len(tiny_model.state_dict()) + len(EXTRA_TENSORS)
    assert sent.num_buckets >= 4
    assert sent.checksum == weights_checksum(
        [*tiny_model.state_dict().items(), *EXTRA_TENSORS.items()]
    )
    expected_layout = [
        (name, str(t.dtype), list(t.shape))
        for name, t in [*tiny_model.state_dict().items(), *EXTRA_TENSORS.items()]
    ]
    assert layouts == [expected_layout, expected_layout]
    for receiver in receivers:
        assert ray.get(receiver.checksum.remote()) == ray.get(sender.checksum.remote())
        assert ray.get(receiver.extras_checksum.remote()) == weights_checksum(EXTRA_TENSORS.items())
        compare_probe_logprobs(
            ray.get(sender.probe_logprobs.remote(probes)),
            ray.get(receiver.probe_logprobs.remote(probes)),
            tolerance=1e-6,
            receiver="collective receiver",
        )
    assert ray.get(sender.default_group_still_works.remote())


def test_probe_mismatch_raises_naming_the_receiver():
    expected = [-130.0, -128.5, -131.25]
    observed = [-130.0, -128.4, -131.25]

    with pytest.raises(WeightSyncError, match="generator-3") as caught:
        compare_probe_logprobs(expected, observed, tolerance=1e-3, receiver="generator-3")

    assert caught.value.receiver == "generator-3"
    assert "0.1" in str(caught.value)


def test_probe_sequences_are_fixed_and_avoid_special_ids(tokenizer):
    special = tokenizer.all_special_ids

    first = probe_sequences(len(tokenizer), count=3, length=10, special_ids=special)
    again = probe_sequences(len(tokenizer), count=3, length=10, special_ids=special)

    assert first == again
    assert [len(sequence) for sequence in first] == [10, 10, 10]
    assert not {token for sequence in first for token in sequence} & set(special)


def test_checksum_ignores_order_and_sees_any_changed_byte():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    reordered = [("b", tensors["b"]), ("a", tensors["a"])]
    reshaped = [("a", tensors["a"].reshape(3, 2)), ("b", tensors["b"])]
    nudged = [("a", tensors["a"] + 1e-6), ("b", tensors["b"])]

    checksum = weights_checksum(tensors.items())

    assert weights_checksum(reordered) == checksum
    assert weights_checksum(reshaped) != checksum
    assert weights_checksum(nudged) != checksum
