"""Weight sync from the learner to generators and scorers: one interface, several transports.

`make_transport("object_store")` or `make_transport("collective", bucket_mb=...)`; both register
themselves here. The vLLM worker extension (`sera_ray.sync.vllm_extension`) is the receiving
side inside a vLLM engine and is imported by vLLM, not from here.
"""

from sera_ray.sync.base import (
    SentWeights,
    WeightSyncError,
    WeightTransport,
    available_transports,
    make_transport,
    register_transport,
)
from sera_ray.sync.checksum import WeightsChecksum, weights_checksum
from sera_ray.sync.collective import CollectiveTransport, WeightGroup, free_port, init_group
from sera_ray.sync.object_store import ObjectStoreTransport, pack_blob, unpack_blob
from sera_ray.sync.probe import compare_probe_logprobs, probe_sequences

__all__ = [
    "CollectiveTransport",
    "ObjectStoreTransport",
    "SentWeights",
    "WeightGroup",
    "WeightSyncError",
    "WeightTransport",
    "WeightsChecksum",
    "available_transports",
    "compare_probe_logprobs",
    "free_port",
    "init_group",
    "make_transport",
    "pack_blob",
    "probe_sequences",
    "register_transport",
    "unpack_blob",
    "weights_checksum",
]
