"""Response log-probs against a direct, slow computation on a tiny random-init model."""

import torch

from sera_ray.algo.logprobs import pair_logprobs, probe_logprobs, sequence_logprobs


def slow_response_logprob(model, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(prompt) + k - 1, token]) for k, token in enumerate(response))


PROMPTS = [[5, 17, 40], [9], [33, 34, 35, 36, 37, 38], [100, 101]]
CHOSEN = [[60, 61, 2], [70, 71, 72, 73, 2], [80, 2], [90, 91, 92]]
REJECTED = [[62, 2], [74, 2], [81, 82, 83, 84, 85, 86, 2], [93]]


def test_pair_logprobs_match_a_direct_computation(tiny_model, tokenizer):
    expected_chosen = [slow_response_logprob(tiny_model, p, r) for p, r in zip(PROMPTS, CHOSEN)]
    expected_rejected = [slow_response_logprob(tiny_model, p, r) for p, r in zip(PROMPTS, REJECTED)]

    with torch.no_grad():
        chosen, rejected, chosen_len, rejected_len = pair_logprobs(
            tiny_model, PROMPTS, CHOSEN, REJECTED, tokenizer.pad_token_id, chunk_size=3
        )

    assert torch.allclose(
        chosen.double(), torch.tensor(expected_chosen, dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(
        rejected.double(), torch.tensor(expected_rejected, dtype=torch.float64), atol=1e-5
    )
    assert chosen_len.tolist() == [len(r) for r in CHOSEN]
    assert rejected_len.tolist() == [len(r) for r in REJECTED]


def test_pair_logprobs_carry_gradients_to_the_policy(tiny_model, tokenizer):
    tiny_model.zero_grad()

    chosen, rejected, _, _ = pair_logprobs(
        tiny_model, PROMPTS, CHOSEN, REJECTED, tokenizer.pad_token_id
    )
    (chosen - rejected).sum().backward()

    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    tiny_model.zero_grad()


def test_length_batched_logprobs_keep_input_order(tiny_model, tokenizer):
    prompts, responses = PROMPTS + PROMPTS, CHOSEN + REJECTED
    expected = [slow_response_logprob(tiny_model, p, r) for p, r in zip(prompts, responses)]

    logps, counts = sequence_logprobs(
        tiny_model, prompts, responses, tokenizer.pad_token_id, max_tokens_per_batch=20
    )

    assert max(abs(a - b) for a, b in zip(logps, expected)) < 1e-5
    assert counts == [len(r) for r in responses]


def test_probe_logprobs_score_every_token_after_the_first(tiny_model):
    sequences = [[5, 6, 7, 8], [10, 11, 12, 13, 14, 15]]

    logps = probe_logprobs(tiny_model, sequences)

    expected = [slow_response_logprob(tiny_model, s[:1], s[1:]) for s in sequences]
    assert max(abs(a - b) for a, b in zip(logps, expected)) < 1e-5
