"""The direct alignment losses a learner can train with, chosen by name (see `available_losses`).

The implementations live in `sera_ray.algo.losses`; this module is the public entry point.
"""

from sera_ray.algo.losses import (
    LOSSES,
    PreferenceLoss,
    available_losses,
    is_reference_free,
    preference_loss,
    register_loss,
)

__all__ = [
    "LOSSES",
    "PreferenceLoss",
    "available_losses",
    "is_reference_free",
    "preference_loss",
    "register_loss",
]
