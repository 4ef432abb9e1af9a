"""The direct alignment losses against their closed forms, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

import sera_ray.algo.losses as losses_module
from sera_ray.losses import PreferenceLoss, available_losses, preference_loss


def pairs_with_log_ratio_differences():
    """Two pairs: h = (pc - rc) - (pr - rr) is 2 for the first and 0 for the second."""
    policy_chosen = torch.tensor([-10.0, -10.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-12.0, -10.0], dtype=torch.float64)
    ref_chosen = torch.tensor([-11.0, -10.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-11.0, -10.0], dtype=torch.float64)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_every_paper_loss_is_registered():
    assert {"dpo", "ipo", "slic", "simpo"} <= set(available_losses())


def test_dpo_is_the_negative_log_sigmoid_of_the_scaled_log_ratio_difference():
    logps = pairs_with_log_ratio_differences()

    result = preference_loss("dpo", *logps, beta=0.5)

    expected = [math.log1p(math.exp(-1.0)), math.log(2.0)]
    assert result.losses.tolist() == pytest.approx(expected)


def test_dpo_label_smoothing_mixes_in_the_loss_of_the_flipped_label():
    logps = pairs_with_log_ratio_differences()

    result = preference_loss("dpo", *logps, beta=0.5, label_smoothing=0.1)

    beta_h = 1.0
    expected_first = 0.9 * math.log1p(math.exp(-beta_h)) + 0.1 * math.log1p(math.exp(beta_h))
    assert result.losses[0].item() == pytest.approx(expected_first)
    assert result.losses[1].item() == pytest.approx(math.log(2.0))


def test_dpo_rejects_label_smoothing_of_one_half_or_more():
    logps = pairs_with_log_ratio_differences()

    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("dpo", *logps, beta=0.5, label_smoothing=0.5)


def test_reference_based_losses_report_beta_times_the_log_ratio_as_implicit_rewards():
    logps = pairs_with_log_ratio_differences()

    result = preference_loss("dpo", *logps, beta=0.5)

    assert result.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert result.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    assert result.margins.tolist() == pytest.approx([1.0, 0.0])


def test_implicit_rewards_are_detached_from_the_graph():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs_with_log_ratio_differences()
    policy_chosen.requires_grad_(True)

    result = preference_loss(
        "dpo", policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5
    )

    assert result.losses.requires_grad
    assert not result.chosen_rewards.requires_grad
    assert not result.margins.requires_grad


def test_ipo_regresses_the_log_ratio_difference_to_one_over_two_beta():
    logps = pairs_with_log_ratio_differences()

    result = preference_loss("ipo", *logps, beta=0.5)

    # The target is 1 / (2 * 0.5) = 1: (2 - 1)^2 and (0 - 1)^2.
    assert result.losses.tolist() == pytest.approx([1.0, 1.0])


def test_ipo_with_length_normalize_divides_each_log_ratio_by_its_token_count():
    logps = pairs_with_log_ratio_differences()
    chosen_lengths = torch.tensor([4, 4])
    rejected_lengths = torch.tensor([2, 2])

    result = preference_loss(
        "ipo",
        *logps,
        beta=0.5,
        length_normalize=True,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )

    # First pair: h = 1 / 4 - (-1) / 2 = 0.75, so (0.75 - 1)^2.
    assert result.losses.tolist() == pytest.approx([0.0625, 1.0])
    assert result.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])


def test_ipo_with_length_normalize_needs_the_token_counts():
    logps = pairs_with_log_ratio_differences()

    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss("ipo", *logps, beta=0.5, length_normalize=True)


def test_slic_is_a_hinge_on_the_implicit_reward_margin():
    logps = pairs_with_log_ratio_differences()

    default_delta = preference_loss("slic", *logps, beta=0.5)
    wider_delta = preference_loss("slic", *logps, beta=0.5, delta=2.0)

    # beta * h is 1 and 0: max(0, 1 - 1), max(0, 1 - 0); then max(0, 2 - 1), max(0, 2 - 0).
    assert default_delta.losses.tolist() == pytest.approx([0.0, 1.0])
    assert wider_delta.losses.tolist() == pytest.approx([1.0, 2.0])


def test_simpo_uses_length_normalised_rewards_and_a_target_margin_without_reference():
    policy_chosen = torch.tensor([-8.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-12.0], dtype=torch.float64)

    result = preference_loss(
        "simpo",
        policy_chosen,
        policy_rejected,
        None,
        None,
        beta=2.0,
        gamma=0.5,
        chosen_lengths=torch.tensor([4]),
        rejected_lengths=torch.tensor([3]),
    )

    # Rewards 2 * -8 / 4 = -4 and 2 * -12 / 3 = -8; the loss is -logsigmoid(-4 + 8 - 0.5).
    assert result.chosen_rewards.tolist() == pytest.approx([-4.0])
    assert result.rejected_rewards.tolist() == pytest.approx([-8.0])
    assert result.losses.item() == pytest.approx(math.log1p(math.exp(-3.5)))


def test_simpo_without_token_counts_says_what_is_missing():
    logps = pairs_with_log_ratio_differences()

    with pytest.raises(ValueError, match="simpo normalises by response length"):
        preference_loss("simpo", *logps, beta=2.0)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "slic", "simpo"])
def test_raising_the_chosen_log_prob_lowers_the_loss_and_raising_the_rejected_raises_it(kind):
    policy_chosen = torch.full((3,), -5.0, dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.full((3,), -5.0, dtype=torch.float64, requires_grad=True)
    reference = torch.full((3,), -5.0, dtype=torch.float64)
    lengths = torch.full((3,), 3)

    result = preference_loss(
        kind,
        policy_chosen,
        policy_rejected,
        reference,
        reference,
        beta=0.1,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
    )
    result.losses.sum().backward()

    assert (policy_chosen.grad < 0).all()
    assert (policy_rejected.grad > 0).all()


def test_an_unknown_kind_names_the_available_ones():
    logps = pairs_with_log_ratio_differences()

    with pytest.raises(ValueError, match="available: dpo"):
        preference_loss("kto-typo", *logps, beta=0.1)


def test_reference_based_losses_need_the_reference_log_probs():
    policy_chosen, policy_rejected, _, _ = pairs_with_log_ratio_differences()

    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss("dpo", policy_chosen, policy_rejected, None, None, beta=0.1)


def test_log_probs_of_different_shapes_are_refused():
    policy_chosen, policy_rejected, ref_chosen, _ = pairs_with_log_ratio_differences()
    ref_rejected = torch.zeros(3, dtype=torch.float64)

    with pytest.raises(ValueError, match="shape"):
        preference_loss("dpo", policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)


def test_a_registered_loss_is_chosen_by_name(monkeypatch):
    monkeypatch.setattr(losses_module, "LOSSES", dict(losses_module.LOSSES))

    @losses_module.register_loss("squared-margin")
    def squared_margin(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None):
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        return PreferenceLoss((chosen - rejected - 1.0) ** 2, chosen, rejected)

    result = preference_loss("squared-margin", *pairs_with_log_ratio_differences(), beta=0.5)

    assert "squared-margin" in available_losses()
    assert result.losses.tolist() == pytest.approx([0.0, 1.0])


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        losses_module.register_loss("dpo")(lambda *args, **kwargs: None)
