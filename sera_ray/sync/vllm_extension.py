"""The receiving side of a weight sync inside a vLLM worker process.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls=...)`), and the engine's
owner calls its methods through `llm.collective_rpc(name, args=...)`. Weights arrive either as
one safetensors blob (object store) or from the weight group (collective), and are loaded in
place with the model runner's `reload_weights`, which also repacks them into vLLM's layout.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class WeightSyncExtension:
    """Worker methods for weight sync; `self` is the vLLM worker that inherits them."""

    def load_weights_blob(self, blob: bytes) -> dict:
        """Load every tensor of a safetensors blob; return what was loaded."""
        from sera_ray.sync.object_store import unpack_blob

        return self._reload_from(unpack_blob(blob).items())

    def init_weight_group(
        self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str
    ) -> None:
        """Join the collective weight group as receiver `rank` (the learner is rank 0)."""
        from sera_ray.sync.collective import CollectiveTransport

        # Limitation: one rank per engine, so a tensor-parallel engine (several workers) cannot
        # join; its workers would need ranks of their own and to keep only their shards.
        self.sera_weight_transport = CollectiveTransport()
        self.sera_weight_transport.init_group(master_addr, master_port, rank, world_size, backend)

    def receive_weights_collective(self) -> dict:
        """Take one broadcast from the weight group and load it; return what was loaded."""
        transport = getattr(self, "sera_weight_transport", None)
        if transport is None:
            raise RuntimeError("call init_weight_group before receive_weights_collective")
        return self._reload_from(transport.receive_weights())

    def _reload_from(self, named_tensors) -> dict:
        """1. stream the tensors into `reload_weights`, hashing each on its way,
        2. report the count, the checksum of what arrived, and the seconds it took."""
        from sera_ray.sync.checksum import WeightsChecksum

        start = time.perf_counter()
        checksum = WeightsChecksum()
        self.model_runner.reload_weights(
            weights_iterator=checksum.passing(named_tensors), is_checkpoint_format=True
        )
        loaded = {
            "num_tensors": checksum.num_tensors,
            "checksum": checksum.hexdigest(),
            "seconds": time.perf_counter() - start,
        }
        logger.info("loaded %d tensors in %.3f s", loaded["num_tensors"], loaded["seconds"])
        return loaded
