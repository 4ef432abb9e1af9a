"""Probe sequences: fixed token sequences whose log-probs prove two copies of a model agree.

After a sync the sender and every receiver score the same probes; their summed log-probs match
only when the weights do. This works across layouts (vLLM repacks its linear layers), where a
weight checksum cannot.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from sera_ray.sync.base import WeightSyncError


def probe_sequences(
    vocab_size: int,
    *,
    count: int = 4,
    length: int = 24,
    seed: int = 1234,
    special_ids: Iterable[int] = (),
) -> list[list[int]]:
    """`count` sequences of `length` token ids drawn from the vocabulary without special ids.

    The same arguments give the same sequences on every machine and Python version.
    """
    excluded = set(special_ids)
    allowed = [token_id for token_id in range(vocab_size) if token_id not in excluded]
    if not allowed:
        raise ValueError("every token id is special: there is nothing to probe with")
    if length < 2:
        raise ValueError("a probe needs at least two tokens: one is scored given the other")
    rng = random.Random(seed)
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(count)]


def compare_probe_logprobs(
    expected: list[float], observed: list[float], *, tolerance: float, receiver: str
) -> float:
    """The largest absolute difference between two lists of probe log-probs.

    Raises WeightSyncError naming `receiver` when the lists differ in length, hold a NaN, or
    differ by more than `tolerance` anywhere.
    """
    if len(expected) != len(observed):
        raise WeightSyncError(
            receiver, f"scored {len(observed)} probe sequences, expected {len(expected)}"
        )
    max_diff = 0.0
    for want, got in zip(expected, observed):
        diff = abs(want - got)
        if math.isnan(diff):
            raise WeightSyncError(receiver, f"probe log-prob is NaN (expected {want}, got {got})")
        max_diff = max(max_diff, diff)
    if max_diff > tolerance:
        raise WeightSyncError(
            receiver,
            f"probe log-probs differ by {max_diff:.3g}, more than the tolerance {tolerance:.3g}",
        )
    return max_diff
