"""Connecting to Ray and placing the roles of a run: learners, generators and scorers.

All roles go into one placement group, one bundle per actor, so a run either gets everything
it asked for or is told, within seconds, which role needs what and what the cluster has.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sera_ray.config import Config, RoleResources
from sera_ray.workers.generator import GeneratorWorker
from sera_ray.workers.learner import LearnerWorker
from sera_ray.workers.scorer import ScorerWorker

logger = logging.getLogger(__name__)


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot hold the roles a run asks for."""


def connect(config: Config) -> None:
    """Join the cluster in cluster.address or RAY_ADDRESS; else start a local Ray.

    A local Ray gets more logical CPUs than the machine has cores (cluster.local_num_cpus):
    the roles spend most of their time waiting on each other, and Ray Data's tasks need CPUs
    beside the ones the roles hold.
    """
    if ray.is_initialized():
        return
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    extensions = config.cluster.torch_extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR")
    if extensions:
        env["TORCH_EXTENSIONS_DIR"] = extensions
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        logger.info("connected to the Ray cluster at %s", address)
        return
    num_cpus = config.cluster.local_num_cpus or max(8, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False)
    logger.info("started a local Ray with %d logical CPUs", num_cpus)


def _bundle(resources: RoleResources) -> dict[str, float]:
    bundle = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        bundle["GPU"] = resources.num_gpus
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01}


@dataclass
class Roles:
    """The actor handles of a run, by role."""

    learners: list[Any]
    policy_generators: list[Any]
    reference_generators: list[Any]
    policy_scorers: list[Any]
    reference_scorers: list[Any]
    placement_group: Any = None
    names: dict[Any, str] = field(default_factory=dict)
    # What earlier runs on these actors already set up (roles may serve several runs).
    process_group_ready: bool = False
    sync_transport: str | None = None
    used: bool = False

    @property
    def policy_receivers(self) -> list[Any]:
        """Every actor that takes the learner's weights after each sync."""
        return self.policy_generators + self.policy_scorers

    def shutdown(self) -> None:
        for actor in (
            self.learners
            + self.policy_generators
            + self.reference_generators
            + self.policy_scorers
            + self.reference_scorers
        ):
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


def plan_roles(config: Config, reference_generator: bool) -> list[tuple[str, RoleResources]]:
    """One (role name, resources) entry per actor, in bundle order."""
    r = config.resources
    plan = [(f"learner-{i}", r.learner) for i in range(config.trainer.num_learners)]
    plan += [(f"generator-{i}", r.generator) for i in range(config.generation.num_generators)]
    if reference_generator:
        plan.append(("reference-generator", r.generator))
    plan += [(f"policy-scorer-{i}", r.scorer) for i in range(config.scoring.num_policy_scorers)]
    plan += [
        (f"reference-scorer-{i}", r.scorer) for i in range(config.scoring.num_reference_scorers)
    ]
    return plan


def describe_shortfall(plan: list[tuple[str, RoleResources]]) -> str:
    """Which role needs what, and what the cluster has."""
    lines = ["the cluster cannot place the roles of this run:"]
    by_role: dict[str, tuple[int, dict[str, float]]] = {}
    for name, resources in plan:
        role = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
        count, _ = by_role.get(role, (0, _bundle(resources)))
        by_role[role] = (count + 1, _bundle(resources))
    for role, (count, bundle) in by_role.items():
        lines.append(f"  {role}: {count} x {bundle}")
    need: dict[str, float] = {}
    for _, resources in plan:
        for key, value in _bundle(resources).items():
            need[key] = need.get(key, 0.0) + value
    total = ray.cluster_resources()
    free = ray.available_resources()
    lines.append(f"  needed in all: {need}")
    lines.append(
        "  cluster total: "
        + str({k: total.get(k, 0.0) for k in need})
        + ", available now: "
        + str({k: round(free.get(k, 0.0), 3) for k in need})
    )
    missing = [k for k, v in need.items() if total.get(k, 0.0) < v]
    if missing:
        lines.append(f"  missing: {', '.join(missing)} (lower resources.* or add nodes)")
    return "\n".join(lines)


def launch_roles(config: Config, *, reference_generator: bool = False) -> Roles:
    """Reserve one placement group for every role, then start the actors in it."""
    plan = plan_roles(config, reference_generator)
    group = placement_group(
        [_bundle(resources) for _, resources in plan], strategy=config.resources.placement_strategy
    )
    ready, _ = ray.wait([group.ready()], timeout=config.cluster.resource_wait_seconds)
    if not ready:
        message = describe_shortfall(plan)
        remove_placement_group(group)
        raise InsufficientResourcesError(message)

    def options(index: int, resources: RoleResources) -> dict[str, Any]:
        return {
            "num_cpus": resources.num_cpus,
            "num_gpus": resources.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index
            ),
        }

    model = config.model
    learners, generators, ref_generators, policy_scorers, ref_scorers = [], [], [], [], []
    names = {}
    extensions = config.cluster.torch_extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR")
    for index, (name, resources) in enumerate(plan):
        opts = options(index, resources)
        if name.startswith("learner"):
            actor = (
                ray.remote(LearnerWorker)
                .options(**opts)
                .remote(
                    len(learners),
                    config.trainer.num_learners,
                    torch_extensions_dir=extensions,
                    name=name,
                )
            )
            learners.append(actor)
        elif name.startswith("generator") or name == "reference-generator":
            is_reference = name == "reference-generator"
            actor = (
                ray.remote(GeneratorWorker)
                .options(**opts)
                .remote(
                    config.reference_path if is_reference else model.policy,
                    backend=config.generation.backend,
                    weights="reference" if is_reference else "policy",
                    dtype=model.dtype,
                    seed=config.run.seed,
                    backend_options=config.generation.vllm_options,
                    name=name,
                )
            )
            (ref_generators if is_reference else generators).append(actor)
        else:
            is_reference = name.startswith("reference")
            actor = (
                ray.remote(ScorerWorker)
                .options(**opts)
                .remote(
                    config.reference_path if is_reference else model.policy,
                    role="reference" if is_reference else "policy",
                    keep_previous=(not is_reference) and config.sera.ensemble_lambda > 0,
                    dtype=model.dtype,
                    max_tokens_per_batch=config.scoring.max_tokens_per_batch,
                    name=name,
                )
            )
            (ref_scorers if is_reference else policy_scorers).append(actor)
        names[actor] = name

    roles = Roles(learners, generators, ref_generators, policy_scorers, ref_scorers, group, names)
    logger.info(
        "placed %d learners, %d generators (+%d reference), %d policy and %d reference scorers",
        len(learners),
        len(generators),
        len(ref_generators),
        len(policy_scorers),
        len(ref_scorers),
    )
    return roles
