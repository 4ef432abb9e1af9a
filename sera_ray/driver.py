"""The driver: a single controller that runs the SeRA loop over Ray actors.

SeRA ("SeRA: Self-Reviewing and Alignment of LLMs using Implicit Reward Margins") iterates,
for t = 1..T:

    1. select     score the offline pairs with the policy of iteration t-1 and keep those with
                  the largest implicit reward margin (iteration 1 keeps all: the policy still
                  equals the reference, so every margin is zero)
    2. bootstrap  sample N responses per prompt from that policy, score them with the implicit
                  reward, and pair the best with the worst (from iteration 2 on)
    3. train      the DAA loss on the kept offline pairs plus the bootstrapped pairs
    4. sync       learner rank 0 -> policy generators and policy scorers, verified by probes
    5. checkpoint the policy in Hugging Face format

The driver moves object refs and Ray Datasets; tensors stay inside the workers. Every stage
writes its output to the run directory before the next stage reads it, and state.json records
the completed iterations, so a run resumes after its last complete iteration.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from sera_ray.cluster import Roles, connect, launch_roles
from sera_ray.config import Config
from sera_ray.data import schema as S
from sera_ray.metrics import MetricsLogger
from sera_ray.rundir import RunDir, read_table, write_table
from sera_ray.sync.base import WeightSyncError
from sera_ray.sync.probe import compare_probe_logprobs, probe_sequences

logger = logging.getLogger(__name__)

IterationHook = Callable[["SeraDriver", int], "dict[str, Any] | None"]


# Stage bodies that run next to the run directory (on the driver's node) as Ray tasks, so the
# driver process itself never holds a whole dataset.


def _prepare_data(config: dict[str, Any], root: str) -> dict[str, Any]:
    """Load, validate and tokenize the offline pairs and the bootstrapping prompts."""
    from transformers import AutoTokenizer

    from sera_ray.config import config_from_dict
    from sera_ray.data.formats import load_pairs, rejected_path_for
    from sera_ray.data.prompts import load_prompts, prompts_from_pairs, tokenize_prompts
    from sera_ray.data.tokenize import tokenize_pairs

    cfg = config_from_dict(config)
    run = RunDir(root)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
    loaded = load_pairs(
        cfg.data.train,
        on_bad_row=cfg.data.on_bad_row,
        rejected_path=rejected_path_for(run.offline_path),
    )
    pairs, stats = tokenize_pairs(
        loaded.table,
        tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        max_length=cfg.data.max_length,
    )
    write_table(pairs, run.offline_path)

    if cfg.data.bootstrap_prompts:
        prompts = tokenize_prompts(
            load_prompts(cfg.data.bootstrap_prompts),
            tokenizer,
            max_prompt_length=cfg.data.max_prompt_length,
        )
    else:
        prompts = prompts_from_pairs(pairs)
    write_table(prompts, run.prompts_path)
    return {
        "pairs": pairs.num_rows,
        "rows_read": loaded.report.rows_read,
        "rows_rejected": loaded.report.rows_read - loaded.report.rows_valid,
        "truncated": stats.truncated,
        "prompts": prompts.num_rows,
    }


def _concat(block_refs: list[Any]) -> pa.Table:
    """One table from a list of block refs (refs nested in a list arrive unresolved)."""
    return pa.concat_tables(ray.get(block_refs), promote_options="permissive")


def _write_blocks(block_refs: list[Any], path: str) -> int:
    table = _concat(block_refs)
    write_table(table, path)
    return table.num_rows


def _select(
    block_refs: list[Any] | None,
    offline_path: str,
    path: str,
    *,
    beta: float,
    kind: str,
    lam: float,
    top_fraction: float | None,
    threshold: float | None,
    keep_all: bool,
) -> dict[str, Any]:
    """Implicit rewards and margins of the offline pairs, and the kept flag."""
    from sera_ray.algo.rewards import score_pairs
    from sera_ray.algo.selection import select_pairs

    table = read_table(offline_path) if block_refs is None else _concat(block_refs)
    table = score_pairs(table, beta=beta, kind=kind, lam=lam)
    if keep_all:
        table, summary = select_pairs(table, top_fraction=1.0)
    else:
        table, summary = select_pairs(table, top_fraction=top_fraction, threshold=threshold)
    write_table(table, path)
    return summary.to_dict()


def _build_bootstrap(
    block_refs: list[Any],
    path: str,
    *,
    iteration: int,
    beta: float,
    kind: str,
    lam: float,
    delta: float,
    length_penalty: float,
    drop_truncated: bool,
) -> dict[str, Any]:
    """Implicit rewards of the sampled responses, then best-vs-worst pairs per prompt."""
    import numpy as np

    from sera_ray.algo.bootstrap import build_bootstrap_pairs
    from sera_ray.algo.rewards import ensemble_reward, implicit_reward

    table = _concat(block_refs)
    policy = np.asarray(table.column("policy_logp").to_numpy(), dtype=np.float64)
    ref = np.asarray(table.column("ref_logp").to_numpy(), dtype=np.float64)
    lengths = np.maximum(np.asarray(table.column("response_len").to_numpy(), np.float64), 1)
    reward = implicit_reward(policy, ref, beta=beta, kind=kind, lengths=lengths)
    if lam > 0:
        previous = np.asarray(table.column("previous_logp").to_numpy(), dtype=np.float64)
        before = implicit_reward(previous, ref, beta=beta, kind=kind, lengths=lengths)
        reward = ensemble_reward(reward, before, lam)
    table = table.append_column("reward", pa.array(reward, pa.float64()))
    pairs, summary = build_bootstrap_pairs(
        table,
        iteration=iteration,
        delta=delta,
        length_penalty=length_penalty,
        drop_truncated=drop_truncated,
    )
    write_table(pairs, path)
    return summary.to_dict()


def map_blocks(blocks: list[Any], actors: list[Any], method: str, desc: str, *args: Any) -> list:
    """Call `method` on each block, round-robin over `actors`; a progress bar tracks it."""
    if not actors:
        raise ValueError(f"{desc}: this run has no actor of that role (see cluster.plan_roles)")
    refs = [
        getattr(actors[i % len(actors)], method).remote(block, *args)
        for i, block in enumerate(blocks)
    ]
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="block", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return refs


def sample_responses(
    generators: list[Any], prompts: pa.Table, sampling: dict[str, Any], batch_size: int
) -> pa.Table:
    """Responses of `generators` for `prompts` (prompt_id, prompt, prompt_ids), in order."""
    blocks = [ray.put(prompts.slice(i, batch_size)) for i in range(0, prompts.num_rows, batch_size)]
    refs = map_blocks(blocks, generators, "generate", "sample", sampling, batch_size)
    return pa.concat_tables(ray.get(refs))


@dataclass
class RunSummary:
    """What a run did: per-iteration counts, stage seconds, and whether every sync verified."""

    run_dir: str
    iterations: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    weight_sync_verified: bool = True
    syncs: int = 0


class SeraDriver:
    """Runs the SeRA loop for one config; the roles (actors) may be shared between runs."""

    def __init__(self, config: Config, roles: Roles | None = None):
        self.config = config
        connect(config)
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = False  # each stage shows its own bar
        # Ray Data 2.60's V2 Parquet reader took 7-10 s for every read of a 64-row file on a
        # 2-core machine, against 0.3 s for the V1 reader; the V1 reader is used for now.
        data_context.use_datasource_v2 = False
        self.roles = roles or launch_roles(
            config, reference_generator=config.bootstrap.candidates != "policy"
        )
        self._owns_roles = roles is None
        self.run = RunDir(Path(config.run.output_dir) / config.run.name)
        self.metrics = MetricsLogger(self.run.metrics_path)
        self.summary = RunSummary(run_dir=str(self.run.root))
        self._node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
        self._probes: list[list[int]] | None = None

    # Plumbing.

    def _local(self, fn, *args, **kwargs):
        """Run `fn` as a Ray task on the driver's node, where the run directory is."""
        task = ray.remote(num_cpus=0.25, scheduling_strategy=self._node)(fn)
        return ray.get(task.remote(*args, **kwargs))

    @contextmanager
    def _stage(self, name: str, iteration: int | None = None) -> Iterator[dict[str, Any]]:
        """Time a stage; log one INFO line and one metrics record with its counts."""
        counts: dict[str, Any] = {}
        start = time.perf_counter()
        yield counts
        seconds = time.perf_counter() - start
        key = name if iteration is None else f"iter_{iteration}/{name}"
        self.summary.stage_seconds[key] = round(seconds, 3)
        self.metrics.log({"stage": name, "iteration": iteration, "seconds": seconds, **counts})
        shown = ", ".join(f"{k}={_short(v)}" for k, v in counts.items() if not isinstance(v, dict))
        where = "" if iteration is None else f" (iteration {iteration})"
        logger.info("stage %s%s done in %.1fs: %s", name, where, seconds, shown)

    def _blocks(self, path: Path, rows_per_block: int, columns: list[str] | None = None):
        """Object refs of Arrow blocks of a Parquet file, read through Ray Data."""
        rows = pq.ParquetFile(path).metadata.num_rows
        ds = ray.data.read_parquet(str(path), columns=columns)
        return ds.repartition(max(1, math.ceil(rows / rows_per_block))).to_arrow_refs(), rows

    # The loop.

    def execute(self, on_iteration: IterationHook | None = None) -> RunSummary:
        """Run (or resume) every iteration; returns the run's summary.

        `on_iteration(driver, t)` runs after each iteration's sync (an evaluation, say); what
        it returns is kept in that iteration's record under "eval".
        """
        cfg = self.config
        run = self.run
        if not cfg.run.resume:
            run.reset_state()
        run.config_path.write_text(cfg.to_yaml())

        if cfg.data.reuse_from and not run.is_complete("reference_scores"):
            self._reuse_prepared_data(RunDir(cfg.data.reuse_from))
        if not run.is_complete("data"):
            with self._stage("data") as counts:
                counts.update(self._local(_prepare_data, cfg.to_dict(), str(run.root)))
            run.mark_complete("data")
        self._start_process_group()
        self._join_weight_sync()

        if not run.is_complete("reference_scores"):
            with self._stage("reference_scores") as counts:
                blocks, rows = self._blocks(run.offline_path, cfg.scoring.rows_per_block)
                scored = map_blocks(
                    blocks, self.roles.reference_scorers, "score_pairs", "reference scores"
                )
                counts["pairs"] = self._local(_write_blocks, scored, str(run.offline_path))
            run.mark_complete("reference_scores")

        first = 1 + max(
            (t for t in range(1, cfg.sera.iterations + 1) if run.is_complete(f"iter_{t}")),
            default=0,
        )
        # The learners start from the initial policy, or from the last complete iteration;
        # receivers are synced to them unless they already hold the initial policy.
        if first > 1:
            logger.info("resuming after iteration %d", first - 1)
            self._setup_learners(str(run.checkpoint_dir(first - 1)))
        else:
            self._setup_learners(cfg.model.policy)
        if first > 1 or self.roles.used:
            self._sync_weights()
        self.roles.used = True

        for iteration in range(first, cfg.sera.iterations + 1):
            self._iteration(iteration)
            if on_iteration is not None:
                with self._stage("eval", iteration) as counts:
                    counts.update(on_iteration(self, iteration) or {})
                self.summary.iterations[-1]["eval"] = counts
            run.mark_complete(f"iter_{iteration}")
        self.metrics.log(
            {
                "stage": "run",
                "weight_sync_verified": self.summary.weight_sync_verified,
                "syncs": self.summary.syncs,
            }
        )
        return self.summary

    def _reuse_prepared_data(self, source: RunDir) -> None:
        """Copy the tokenized, reference-scored pairs and the prompts of another run."""
        if not source.is_complete("reference_scores"):
            raise RuntimeError(f"data.reuse_from={source.root} has no reference scores yet")
        with self._stage("reuse_data") as counts:
            for name in (source.offline_path.name, source.prompts_path.name):
                shutil.copyfile(source.root / name, self.run.root / name)
            counts["from"] = str(source.root)
        self.run.mark_complete("data")
        self.run.mark_complete("reference_scores")

    def _iteration(self, t: int) -> None:
        cfg = self.config
        record: dict[str, Any] = {"iteration": t}

        with self._stage("select", t) as counts:
            counts.update(self._select_stage(t))
        record["selection"] = counts

        bootstrap_path = None
        if cfg.bootstrap.enabled and t > 1:
            with self._stage("bootstrap", t) as counts:
                counts.update(self._bootstrap_stage(t, kept=record["selection"]["kept"]))
            record["bootstrap"] = counts
            bootstrap_path = self.run.bootstrap_path(t)

        if cfg.sera.restart_from_reference and t > 1:
            self._setup_learners(cfg.reference_path)
        with self._stage("train", t) as counts:
            counts.update(self._train_stage(t, bootstrap_path))
        record["train"] = counts

        with self._stage("sync", t) as counts:
            counts.update(self._sync_weights())
        record["sync"] = counts

        with self._stage("checkpoint", t) as counts:
            path = str(self.run.checkpoint_dir(t))
            ray.get([learner.save_checkpoint.remote(path) for learner in self.roles.learners])
            counts["path"] = path
        self.summary.iterations.append(record)

    # Stages.

    def _select_stage(self, t: int) -> dict[str, Any]:
        """Score offline pairs with the current policy; keep the largest margins."""
        cfg = self.config
        run = self.run
        options = dict(
            beta=cfg.trainer.beta,
            kind=cfg.trainer.loss,
            lam=cfg.sera.ensemble_lambda,
            top_fraction=cfg.selection.top_fraction,
            threshold=cfg.selection.threshold,
        )
        # The policy equals the reference in iteration 1: all margins are zero, keep all.
        # Without selection (plain DAA) nothing is scored either.
        keep_all = t == 1 or not cfg.selection.enabled
        scored = None
        if keep_all:
            options.update(lam=0.0)
        else:
            blocks, _ = self._blocks(run.offline_path, cfg.scoring.rows_per_block)
            scored = map_blocks(
                blocks, self.roles.policy_scorers, "score_pairs", f"policy scores (iteration {t})"
            )
        return self._local(
            _select,
            scored,
            str(run.offline_path),
            str(run.selected_path(t)),
            keep_all=keep_all,
            **options,
        )

    def _bootstrap_stage(self, t: int, kept: int) -> dict[str, Any]:
        """Sample N responses per prompt, score them, pair the best with the worst."""
        cfg = self.config
        boot = cfg.bootstrap
        ds = ray.data.read_parquet(str(self.run.prompts_path))
        total = pq.ParquetFile(self.run.prompts_path).metadata.num_rows
        wanted = min(total, boot.num_prompts or max(kept, 1))
        batch = cfg.generation.batch_size
        prompts = (
            ds.random_shuffle(seed=cfg.run.seed + t)
            .limit(wanted)
            .repartition(max(1, math.ceil(wanted / batch)))
            .to_arrow_refs()
        )

        def sampling(n: int, offset: int) -> dict[str, Any]:
            return {
                "n": n,
                "temperature": cfg.generation.temperature,
                "top_p": cfg.generation.top_p,
                "max_new_tokens": cfg.generation.max_new_tokens,
                "seed": cfg.run.seed + 1000 * t + offset,
            }

        # 1. sample candidates from the policy, the reference, or half from each
        sources = {"policy": [(self.roles.policy_generators, boot.num_samples)]}
        sources["reference"] = [(self.roles.reference_generators, boot.num_samples)]
        half = boot.num_samples // 2
        sources["mixed"] = [
            (self.roles.policy_generators, boot.num_samples - half),
            (self.roles.reference_generators, half),
        ]
        candidates = []
        for offset, (generators, n) in enumerate(sources[boot.candidates]):
            candidates += map_blocks(
                prompts,
                generators,
                "generate",
                f"sample {boot.candidates} (iteration {t})",
                sampling(n, offset),
                batch,
            )

        # 2. score each candidate under the policy (and the previous policy) and the reference
        scored = map_blocks(
            candidates, self.roles.policy_scorers, "score_responses", "policy scores"
        )
        scored = map_blocks(
            scored, self.roles.reference_scorers, "score_responses", "reference scores"
        )

        # 3. best-vs-worst pairs by implicit reward, written to iter_<t>/bootstrap.parquet
        summary = self._local(
            _build_bootstrap,
            scored,
            str(self.run.bootstrap_path(t)),
            iteration=t,
            beta=cfg.trainer.beta,
            kind=cfg.trainer.loss,
            lam=cfg.sera.ensemble_lambda,
            delta=boot.delta,
            length_penalty=boot.length_penalty,
            drop_truncated=boot.drop_truncated,
        )
        return {"prompts_sampled": wanted, **summary}

    def _train_stage(self, t: int, bootstrap_path: Path | None) -> dict[str, Any]:
        """Stream kept offline pairs plus bootstrapped pairs to the learners' shards."""
        cfg = self.config
        columns = S.TRAIN_COLUMNS
        offline = (
            ray.data.read_parquet(str(self.run.selected_path(t)), columns=columns + [S.KEPT])
            .map_batches(_kept_rows, batch_format="pyarrow")
            .select_columns(columns)
        )
        ds = offline
        if bootstrap_path is not None and read_table(bootstrap_path, [S.PAIR_ID]).num_rows:
            ds = offline.union(ray.data.read_parquet(str(bootstrap_path), columns=columns))
        ds = ds.random_shuffle(seed=cfg.run.seed + t)
        rows = ds.count()
        learners = self.roles.learners
        if rows < len(learners):
            raise RuntimeError(f"iteration {t} has {rows} training pairs for {len(learners)} ranks")
        shards = ds.streaming_split(len(learners), equal=True)

        history: list[dict[str, Any]] = []
        for _ in tqdm(range(cfg.trainer.epochs), desc=f"train (iteration {t})", leave=False):
            results = ray.get(
                [
                    learner.train.remote(shard, epochs=1, iteration=t)
                    for learner, shard in zip(learners, shards)
                ]
            )
            history += results[0]
        for step in history:
            self.metrics.log(step)
        last = history[-1] if history else {}
        return {
            "pairs": rows,
            "steps": len(history),
            "loss": last.get("loss"),
            "rewards/accuracies": last.get("rewards/accuracies"),
            "rewards/margins": last.get("rewards/margins"),
        }

    # Learners and weight sync.

    def _start_process_group(self) -> None:
        """The learners' torch.distributed group (once per set of actors)."""
        learners = self.roles.learners
        if not self.roles.process_group_ready:
            master_addr, master_port = ray.get(learners[0].address.remote())
            ray.get([lr.init_process_group.remote(master_addr, master_port) for lr in learners])
            self.roles.process_group_ready = True

    def _setup_learners(self, model_path: str) -> None:
        trainer = self.config.trainer.model_dump()
        dtype = self.config.model.dtype
        ray.get([lr.setup.remote(model_path, trainer, dtype) for lr in self.roles.learners])

    def _join_weight_sync(self) -> None:
        """Rank 0 of the learners and every policy receiver join the transport (once)."""
        sync = self.config.sync
        if self.roles.sync_transport == sync.transport:
            return
        options = {"bucket_mb": sync.bucket_mb} if sync.transport == "collective" else {}
        receivers = self.roles.policy_receivers
        calls = []
        if sync.transport == "collective":
            addr, port = ray.get(self.roles.learners[0].address.remote())
            world = 1 + len(receivers)
            backend = "nccl" if self.config.resources.learner.num_gpus > 0 else "gloo"

            def group(rank: int) -> dict[str, Any]:
                return {
                    "master_addr": addr,
                    "master_port": port,
                    "rank": rank,
                    "world_size": world,
                    "backend": backend,
                }

            calls.append(
                self.roles.learners[0].join_weight_sync.remote(sync.transport, options, group(0))
            )
            calls += [
                r.join_weight_sync.remote(sync.transport, options, group(rank))
                for rank, r in enumerate(receivers, start=1)
            ]
        else:
            calls.append(self.roles.learners[0].join_weight_sync.remote(sync.transport, options))
            calls += [r.join_weight_sync.remote(sync.transport, options) for r in receivers]
        ray.get(calls)
        self.roles.sync_transport = sync.transport

    def probes(self) -> list[list[int]]:
        if self._probes is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.config.model.policy)
            self._probes = probe_sequences(
                len(tokenizer),
                count=self.config.sync.probe_count,
                length=self.config.sync.probe_length,
                seed=self.config.run.seed + 1234,
                special_ids=tokenizer.all_special_ids,
            )
        return self._probes

    def _sync_weights(self) -> dict[str, Any]:
        """Learner rank 0 -> every policy receiver, then prove that both sides agree.

        1. send and receive (at once for a collective; a blob through the object store else)
        2. probe: the learner and each receiver score the same fixed sequences
        3. checksum: receivers that keep the learner's layout hash their weights
        """
        learners = self.roles.learners
        receivers = self.roles.policy_receivers
        names = self.roles.names
        start = time.perf_counter()

        # 1. transfer
        if self.roles.sync_transport == "collective":
            received = [r.receive_weights.remote(None) for r in receivers]
            sent = ray.get([lr.send_weights.remote() for lr in learners])[0]
            ray.get(received)
        else:
            sent = ray.get([lr.send_weights.remote() for lr in learners])[0]
            ray.get([r.receive_weights.remote(sent.payload) for r in receivers])
        seconds = time.perf_counter() - start

        # 2. probe log-probs
        probes = self.probes()
        expected = ray.get([lr.probe_logprobs.remote(probes) for lr in learners])[0]
        observed = ray.get([r.probe_logprobs.remote(probes) for r in receivers])
        max_diff = 0.0
        try:
            for receiver, logps in zip(receivers, observed):
                diff = compare_probe_logprobs(
                    expected,
                    logps,
                    tolerance=self.config.sync.probe_tolerance,
                    receiver=names[receiver],
                )
                max_diff = max(max_diff, diff)

            # 3. weight checksums, where the receiver keeps the learner's layout
            checksums = ray.get([r.weights_checksum.remote() for r in receivers])
            compared = 0
            for receiver, checksum in zip(receivers, checksums):
                if checksum is None:
                    continue
                compared += 1
                if checksum != sent.checksum:
                    raise WeightSyncError(
                        names[receiver], f"weight checksum {checksum[:12]} != {sent.checksum[:12]}"
                    )
        except WeightSyncError:
            self.summary.weight_sync_verified = False
            raise
        self.summary.syncs += 1
        return {
            "sync/seconds": seconds,
            "sync/bytes": sent.num_bytes,
            "sync/tensors": sent.num_tensors,
            "sync/receivers": len(receivers),
            "sync/probe_max_diff": max_diff,
            "sync/checksums_compared": compared,
            "sync/verified": True,
        }

    # For callers that evaluate a policy (the toy world, benchmarks).

    def sample(
        self, prompts: pa.Table, sampling: dict[str, Any], weights: str = "policy"
    ) -> pa.Table:
        """Sample responses from the current policy (or the reference) for `prompts`."""
        generators = (
            self.roles.policy_generators if weights == "policy" else self.roles.reference_generators
        )
        return sample_responses(generators, prompts, sampling, self.config.generation.batch_size)

    def shutdown(self) -> None:
        self.metrics.close()
        if self._owns_roles:
            self.roles.shutdown()


def _kept_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column(S.KEPT))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sera(
    config: Config, roles: Roles | None = None, on_iteration: IterationHook | None = None
) -> RunSummary:
    """Run SeRA for `config`; starts (and afterwards stops) the actors unless given `roles`."""
    driver = SeraDriver(config, roles)
    try:
        return driver.execute(on_iteration)
    finally:
        driver.shutdown()
