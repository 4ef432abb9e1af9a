"""Learner worker: one DeepSpeed rank of the group that trains the policy with a DAA loss.

The ranks form one torch.distributed group inside Ray actors (gloo on CPUs, NCCL on GPUs).
They hold no reference model: the reference log-probs travel with each pair from the scoring
stage. Chosen and rejected go through one forward, and the LM head runs on response positions
only (see sera_ray.algo.logprobs).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sera_ray.algo.logprobs import pair_logprobs, probe_logprobs
from sera_ray.data import schema as S
from sera_ray.losses import preference_loss
from sera_ray.sync.base import SentWeights, make_transport
from sera_ray.sync.checksum import weights_checksum

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


class LearnerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        torch_extensions_dir: str | None = None,
        name: str | None = None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.name = name or f"learner-{rank}"
        if torch_extensions_dir:
            os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir
        self.engine = None
        self._transport = None

    def address(self) -> tuple[str, int]:
        """An address and free port on this node, for rendezvous (asked of rank 0)."""
        return node_address(), free_port()

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the learners' torch.distributed group through DeepSpeed."""
        import deepspeed

        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # Ray gives each rank its own visible device
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        logger.info("%s joined the %s group (%d ranks)", self.name, backend, self.world_size)

    def setup(self, model_path: str, trainer: dict[str, Any], dtype: str = "float32") -> None:
        """Load the policy and build the DeepSpeed engine (again, when called again)."""
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.trainer = trainer
        self.model_path = model_path
        self.zero_stage = trainer["zero_stage"]
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            dtype, torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.pad_token_id = model.config.pad_token_id or 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

        optimizer = torch.optim.AdamW(
            model.parameters(), lr=trainer["learning_rate"], weight_decay=trainer["weight_decay"]
        )
        warmup = max(trainer["warmup_steps"], 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        micro = trainer["micro_batch_size"]
        accumulation = trainer["gradient_accumulation_steps"]
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * self.world_size,
            "gradient_clipping": trainer["max_grad_norm"],
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if self.engine is not None:
            self.engine.destroy()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.global_step = 0
        logger.info("%s set up ZeRO-%d from %s", self.name, self.zero_stage, model_path)

    def train(self, shard, *, epochs: int, iteration: int) -> list[dict[str, float]]:
        """Train on this rank's stream of pairs; returns per-step metrics (rank 0).

        Every rank gets the same number of batches (the driver splits with equal=True), so
        the ranks step together.
        """
        import torch.distributed as dist

        trainer = self.trainer
        self.engine.train()
        history: list[dict[str, float]] = []
        sums = torch.zeros(8, dtype=torch.float64)
        micro_steps = 0
        start = time.perf_counter()
        for epoch in range(epochs):
            waited = time.perf_counter()
            for batch in shard.iter_batches(
                batch_size=trainer["micro_batch_size"], batch_format="pyarrow"
            ):
                computed = time.perf_counter()
                chosen, rejected, chosen_len, rejected_len = pair_logprobs(
                    self.engine.module,
                    batch.column(S.PROMPT_IDS).to_pylist(),
                    batch.column(S.CHOSEN_IDS).to_pylist(),
                    batch.column(S.REJECTED_IDS).to_pylist(),
                    self.pad_token_id,
                    chunk_size=trainer["logprob_chunk_size"],
                )
                device = chosen.device
                ref_chosen = torch.tensor(
                    batch.column(S.REF_CHOSEN_LOGP).to_pylist(), dtype=chosen.dtype, device=device
                )
                ref_rejected = torch.tensor(
                    batch.column(S.REF_REJECTED_LOGP).to_pylist(),
                    dtype=chosen.dtype,
                    device=device,
                )
                out = preference_loss(
                    trainer["loss"],
                    chosen,
                    rejected,
                    ref_chosen,
                    ref_rejected,
                    beta=trainer["beta"],
                    chosen_lengths=chosen_len,
                    rejected_lengths=rejected_len,
                    **trainer["loss_options"],
                )
                loss = out.losses.mean()
                self.engine.backward(loss)
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                micro_steps += 1

                margins = (out.chosen_rewards - out.rejected_rewards).detach()
                sums += torch.tensor(
                    [
                        float(loss.detach()),
                        float(out.chosen_rewards.mean()),
                        float(out.rejected_rewards.mean()),
                        float(margins.mean()),
                        float((margins > 0).float().mean()),
                        1.0,
                        computed - waited,
                        time.perf_counter() - computed,
                    ],
                    dtype=torch.float64,
                )
                waited = time.perf_counter()
                if not boundary:
                    continue

                # Average this step's micro-batches over every rank.
                self.global_step += 1
                dist.all_reduce(sums)
                count = sums[5].item()
                history.append(
                    {
                        "iteration": iteration,
                        "epoch": epoch,
                        "step": self.global_step,
                        "loss": sums[0].item() / count,
                        "rewards/chosen": sums[1].item() / count,
                        "rewards/rejected": sums[2].item() / count,
                        "rewards/margins": sums[3].item() / count,
                        "rewards/accuracies": sums[4].item() / count,
                        "lr": self.engine.get_lr()[0],
                        "time/data_seconds": sums[6].item() / self.world_size,
                        "time/compute_seconds": sums[7].item() / self.world_size,
                    }
                )
                sums.zero_()
        seconds = time.perf_counter() - start
        logger.info(
            "%s trained iteration %d: %d steps, %d micro-batches in %.1fs",
            self.name,
            iteration,
            len(history),
            micro_steps,
            seconds,
        )
        return history if self.rank == 0 else []

    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter whole, one at a time; under ZeRO-3 gathered (all ranks take part)."""
        import deepspeed

        for name, param in self.engine.module.named_parameters():
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.data.detach().clone() if self.rank == 0 else None
                if self.rank == 0:
                    yield name, full
            else:
                yield name, param.detach()

    def join_weight_sync(
        self, transport: str, options: dict[str, Any], group: dict[str, Any] | None = None
    ) -> None:
        """Rank 0 sets up the sender side (and joins the collective as rank 0)."""
        if self.rank != 0:
            return
        self._transport = make_transport(transport, **options)
        if group is not None:
            self._transport.init_group(**group)

    def send_weights(self) -> SentWeights | None:
        """Rank 0 sends the policy's weights; under ZeRO-3 the others help gather them."""
        if self.rank != 0:
            if self.zero_stage == 3:
                for _ in self._full_parameters():
                    pass
            return None
        return self._transport.send_weights(self._full_parameters())

    def probe_logprobs(self, sequences: list[list[int]]) -> list[float] | None:
        """Probe log-probs of the policy (every rank runs the forward under ZeRO-3)."""
        logps = probe_logprobs(self.engine.module, sequences)
        return logps if self.rank == 0 else None

    def weights_checksum(self) -> str | None:
        named = list(self._full_parameters())
        return weights_checksum(named) if self.rank == 0 else None

    def save_checkpoint(self, path: str) -> str | None:
        """Write the policy in Hugging Face format (safetensors) from rank 0."""
        state = dict(self._full_parameters())
        if self.rank != 0:
            return None
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in state.items()}
        self.engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return str(out)
