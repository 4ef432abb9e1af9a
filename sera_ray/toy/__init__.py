"""The toy world: a digit-sorting task, its gold reward, a reference model and offline pairs."""

from sera_ray.toy.world import (
    FILLER,
    TASK,
    ToyWorld,
    ToyWorldConfig,
    build_world,
    evaluate_answers,
    gold_reward,
    has_filler,
    win_rate,
)

__all__ = [
    "FILLER",
    "TASK",
    "ToyWorld",
    "ToyWorldConfig",
    "build_world",
    "evaluate_answers",
    "gold_reward",
    "has_filler",
    "win_rate",
]
