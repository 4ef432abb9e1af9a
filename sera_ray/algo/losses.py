"""Direct alignment losses (DPO, IPO, SLiC-HF, SimPO) behind one registry.

Every loss takes the summed response log-probs of a batch of pairs under the policy and the
reference, each of shape [pairs], and returns the per-pair losses together with the implicit
rewards of the chosen and rejected responses. The learner chooses a loss by name from the
config; a new direct alignment algorithm is one function decorated with `@register_loss(name)`.

Notation in the docstrings: pc, pr are the policy log-probs of the chosen and rejected
responses, rc, rr the reference log-probs, and h = (pc - rc) - (pr - rr) the log-ratio
difference, so that beta * h is the implicit reward margin of the pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses (differentiable) and the implicit rewards they imply (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """The implicit reward margin of each pair: chosen reward minus rejected reward."""
        return self.chosen_rewards - self.rejected_rewards


LossFn = Callable[..., PreferenceLoss]

LOSSES: dict[str, LossFn] = {}
_REFERENCE_FREE: set[str] = set()


def register_loss(name: str, *, reference_free: bool = False) -> Callable[[LossFn], LossFn]:
    """Add a loss to `LOSSES` under `name`.

    A reference-free loss ignores the reference log-probs, and its implicit reward is the
    length-normalised policy log-prob (as in SimPO) rather than the policy-reference log-ratio.
    """

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered")
        LOSSES[name] = fn
        if reference_free:
            _REFERENCE_FREE.add(name)
        return fn

    return decorator


def available_losses() -> list[str]:
    """The registered loss kinds, sorted."""
    return sorted(LOSSES)


def is_reference_free(kind: str) -> bool:
    """Whether the loss `kind` ignores the reference (its implicit reward needs token counts)."""
    _check_kind(kind)
    return kind in _REFERENCE_FREE


def preference_loss(
    kind: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    **options,
) -> PreferenceLoss:
    """Compute the loss `kind` over a batch of pairs.

    The log-probs are summed over response tokens, shape [pairs]. `options` are the loss's own
    settings (`label_smoothing` for dpo, `gamma` for simpo, ...). Every loss also accepts
    `chosen_lengths` and `rejected_lengths` (response token counts), so a learner can always
    pass them; the losses that do not normalise by length ignore them.
    """
    _check_kind(kind)
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    reference_free = kind in _REFERENCE_FREE
    _check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reference_free=reference_free,
    )

    return LOSSES[kind](
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        **options,
    )


@register_loss("dpo")
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO: -logsigmoid(beta * h).

    With `label_smoothing` eps > 0 this is conservative DPO, which assumes each preference label
    is flipped with probability eps:
    -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps

    logits = beta * (chosen_log_ratio - rejected_log_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0.0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)

    return _with_log_ratio_rewards(losses, chosen_log_ratio, rejected_log_ratio, beta)


@register_loss("ipo")
def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    length_normalize: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """IPO: (h - 1 / (2 * beta))^2, a squared loss that regresses h to a fixed target.

    h is the difference of log-ratios summed over the response tokens. With `length_normalize`
    each log-ratio is divided by its response's token count first, which needs
    `chosen_lengths` and `rejected_lengths`. The implicit rewards are the summed log-ratios
    times beta either way, so that they stay comparable across losses.
    """
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps

    if length_normalize:
        chosen_lengths, rejected_lengths = _lengths_like(
            "ipo with length_normalize", chosen_lengths, rejected_lengths, policy_chosen_logps
        )
        h = chosen_log_ratio / chosen_lengths - rejected_log_ratio / rejected_lengths
    else:
        h = chosen_log_ratio - rejected_log_ratio
    losses = (h - 1.0 / (2.0 * beta)) ** 2

    return _with_log_ratio_rewards(losses, chosen_log_ratio, rejected_log_ratio, beta)


@register_loss("slic")
def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    delta: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """SLiC-HF's calibration hinge, on the implicit reward margin: max(0, delta - beta * h).

    SLiC-HF states the hinge on policy log-probs alone and adds a regularisation term; this is
    the form used with a reference in the DPO family, where the pair stops contributing once
    its implicit reward margin reaches `delta` (1 by default).
    """
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps

    losses = torch.relu(delta - beta * (chosen_log_ratio - rejected_log_ratio))

    return _with_log_ratio_rewards(losses, chosen_log_ratio, rejected_log_ratio, beta)


@register_loss("simpo", reference_free=True)
def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    gamma: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """SimPO: -logsigmoid(beta * pc / |y_w| - beta * pr / |y_l| - gamma), reference free.

    The implicit reward of a response is its length-normalised log-prob times beta; `gamma` is
    the target margin, in the same reward units. The reference log-probs are ignored.
    """
    chosen_lengths, rejected_lengths = _lengths_like(
        "simpo", chosen_lengths, rejected_lengths, policy_chosen_logps
    )

    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)

    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _with_log_ratio_rewards(
    losses: torch.Tensor,
    chosen_log_ratio: torch.Tensor,
    rejected_log_ratio: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """Attach the implicit rewards beta * (policy - reference) of the reference-based losses."""
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_log_ratio).detach(),
        rejected_rewards=(beta * rejected_log_ratio).detach(),
    )


def _lengths_like(
    what: str,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token counts as tensors of `like`'s dtype and device, checked to be positive."""
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            f"{what} normalises by response length: pass chosen_lengths and rejected_lengths "
            "(token counts of each response)"
        )
    converted = []
    for lengths in (chosen_lengths, rejected_lengths):
        lengths = torch.as_tensor(lengths, dtype=like.dtype, device=like.device)
        if lengths.shape != like.shape:
            raise ValueError(
                f"lengths must have the shape of the log-probs {tuple(like.shape)}, "
                f"got {tuple(lengths.shape)}"
            )
        if bool((lengths <= 0).any()):
            raise ValueError(f"{what}: every response length must be positive")
        converted.append(lengths)
    return converted[0], converted[1]


def _check_kind(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; available: {', '.join(available_losses())}")


def _check_shapes(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    reference_free: bool,
) -> None:
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if not reference_free:
        missing = [name for name, value in named.items() if value is None]
        if missing:
            raise ValueError(f"this loss needs the reference log-probs; missing: {missing}")
    shape = policy_chosen_logps.shape
    for name, value in named.items():
        if value is None:
            continue
        if value.dim() != 1 or value.shape != shape:
            raise ValueError(
                f"log-probs must all have shape [pairs] {tuple(shape)}; "
                f"{name} has {tuple(value.shape)}"
            )
