"""The reward interface: loading a reward, the fault boundary around it, and the weighted sum of several.

A reward is a plain callable ``fn(prompt, response, **metadata)`` (``metadata`` holds the prompt's
``answer``) that returns either

- a float, the sample's reward; or
- a dict of named floats, its components. The reward is the dict's ``total`` entry when it has one
  (the other entries are then recorded, not added), else the sum of all entries.

A callable marked batched (``@batched``, or a ``batched = True`` attribute) is called once per group
as ``fn(prompts, responses, metadata)`` with three lists of equal length, and returns a list of such
values in the same order.

The config names a reward as ``package.module:function``, as ``path/to/file.py:function`` (a file
outside any package, imported under a private module name), or as a built-in reward model
(``http``, ``local_rm``: ``REWARD_MODELS``). ``reward.fns`` sums several with weights; each is then
recorded as a component under its name, and its own components as ``<name>/<component>``.

The fault boundary is ``RewardScorer``: a reward that raises, returns NaN or inf (as the total or as
any component), returns something other than a float or a dict of floats, or runs past
``reward.timeout_s`` marks only that sample failed (reward 0.0, ``reward_failed``); the run goes
on. A batched reward that raises, times out, or returns a list of the wrong type or length fails
its whole batch; a bad value at one position fails only that sample. With several rewards, one
failing fails the sample, but the components the others computed are kept. Every failure is
counted per reward and kind (the exception type, in ``RewardScorer.failures``); the first of each
kind is logged as a warning, later ones at debug level.

Timeouts: a call with a deadline runs in a daemon thread of its own. Python cannot kill a thread, so
a call past its deadline keeps running in the background and its result is dropped; being a daemon,
it never holds up process exit. When ``reward.max_hung_calls`` of them are still running, the reward
hangs rather than runs slow, and the scorer raises instead of leaking more threads: the rollout
worker stops and the run fails with the reward's name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from asyncrl.rewards.http import HttpRewardModel
from asyncrl.rewards.local_rm import LocalRewardModel
from asyncrl.rewards.reward_worker import RemoteRewardModel

if TYPE_CHECKING:
    from asyncrl.config import RewardConfig

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
"""``(prompt, response, **metadata) -> float | dict[str, float]``, or batched (see the module docstring)."""

TOTAL = "total"
"""The key of a reward dict that holds the reward itself."""

REWARD_MODELS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "http": lambda cfg: HttpRewardModel.from_config(cfg.http),
    "local_rm": lambda cfg: (
        RemoteRewardModel(cfg.local_rm.timeout_s) if cfg.local_rm.worker else LocalRewardModel.from_config(cfg.local_rm)
    ),
}
"""Built-in reward models by config name, each built from its section of the reward config."""


class RewardTimeout(TimeoutError):
    """A reward call ran past ``reward.timeout_s``."""


class NonFiniteReward(ValueError):
    """A reward (or one of its components) was NaN or infinite."""


def batched(fn: RewardFn) -> RewardFn:
    """Mark ``fn`` as batched: called as ``fn(prompts, responses, metadata)`` with lists, it returns a list."""
    fn.batched = True
    return fn


def is_batched(fn: RewardFn) -> bool:
    return getattr(fn, "batched", False) is True


# --- loading ------------------------------------------------------------------------------------------------------


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``package.module:function`` or ``path/to/file.py:function``; a clear error names what is missing."""
    return load_callable(spec, "reward.fn")


def load_callable(spec: str, key: str) -> Callable[..., Any]:
    """The callable ``package.module:name`` or ``path/to/file.py:name`` names; errors name the config ``key``.

    A file is imported once per process under a private module name made from its absolute path, so two
    files with the same name do not collide and the file need not be on ``sys.path``.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"{key} must look like package.module:name or path/to/file.py:name, got {spec!r}")
    module = _load_file(target, key) if target.endswith(".py") else _import(target, key)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: {target!r} has no callable {attr!r}")
    return fn


def _import(module_name: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}: cannot import module {module_name!r}: {err}") from None


def _load_file(path_text: str, key: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{key}: file not found: {path_text}")
    name = f"_asyncrl_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickle look a module up by its name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build_reward_fn(spec: str, cfg: RewardConfig) -> RewardFn:
    """The reward a spec names: a built-in reward model made from ``cfg``, else a loaded function."""
    if spec in REWARD_MODELS:
        return REWARD_MODELS[spec](cfg)
    return load_reward_fn(spec)


def build_scorer(cfg: RewardConfig) -> RewardScorer:
    """The scorer ``cfg`` describes: the weighted, named ``reward.fns``, or the single ``reward.fn``."""
    if cfg.fns:
        terms = [RewardTerm(term.name, build_reward_fn(term.fn, cfg), term.weight) for term in cfg.fns]
    else:
        terms = [RewardTerm(cfg.fn.rpartition(":")[2], build_reward_fn(cfg.fn, cfg))]
    return RewardScorer(
        terms, timeout_s=cfg.timeout_s, max_hung_calls=cfg.max_hung_calls, named_components=bool(cfg.fns)
    )


# --- the fault boundary -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RewardTerm:
    """One reward of a weighted sum."""

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RewardResult:
    """The score of one sample."""

    reward: float
    """The weighted sum of the rewards; 0.0 when failed."""
    failed: bool
    """A reward raised, timed out, or returned a bad value for this sample."""
    components: dict[str, float] = field(default_factory=dict)
    """Named components: a single reward's dict entries (``total`` aside), or each of several rewards by name."""
    error: str | None = None
    """Why it failed: the type name of the first failure (``RewardTimeout`` for a timeout, ``NonFiniteReward`` for
    NaN/inf, or whatever the reward raised); None when it did not fail."""


class _CallThread:
    """A daemon thread that runs reward calls one at a time for a caller that waits with a deadline per call.

    Handing calls to a live thread costs ~0.1 ms, or more on a loaded machine, so a group's samples go over
    in one handoff (``call_each``); starting a thread per call cost ~1 ms per sample on a busy rollout worker,
    a large share of a small model's generation time. After a call runs past its deadline the thread is
    abandoned: it finishes that call in the background, starts none of the rest, and exits.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()  # a call starts, or the caller gives up on the rest, never both
        self._retired = False
        self._started = 0  # calls of the current list started
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (job := self._calls.get()) is not None:
            fn, calls, outcomes, done = job
            for (args, kwargs), outcome, event in zip(calls, outcomes, done, strict=True):
                with self._lock:
                    if self._retired:
                        break
                    self._started += 1
                try:
                    outcome["value"] = fn(*args, **kwargs)
                except BaseException as err:  # handed to the caller's thread, which decides what it means
                    outcome["error"] = err
                if event is done[-1]:
                    self._idle.set()  # before done: the caller's next list clears it only after done
                event.set()
            else:
                continue
            self._idle.set()

    def call_each(self, fn: RewardFn, calls: list[tuple[tuple, dict]], timeout_s: float) -> tuple[list[dict], int]:
        """``{"value": ...}`` or ``{"error": ...}`` of each ``fn(*args, **kwargs)`` in order, and how many calls
        this thread took: all of them, or, once one runs past ``timeout_s`` (counted from the end of the one
        before), the outcomes before it and the calls it had started (the first timed out, the last maybe just
        begun): the thread is then retired and the rest were never started."""
        outcomes: list[dict[str, Any]] = [{} for _ in calls]
        done = [threading.Event() for _ in calls]
        self._idle.clear()
        self._started = 0
        self._calls.put((fn, calls, outcomes, done))
        for index, event in enumerate(done):
            if not event.wait(timeout_s):
                with self._lock:
                    self._retired = True
                    started = self._started
                self._calls.put(None)
                return outcomes[:index], started
        return outcomes, len(calls)

    def busy(self) -> bool:
        """Whether a call is still running."""
        return not self._idle.is_set()


class RewardScorer:
    """Scores samples with one or more weighted rewards; the fault boundary of user reward code."""

    def __init__(
        self,
        terms: Sequence[RewardTerm],
        *,
        timeout_s: float = 0.0,
        max_hung_calls: int = 8,
        named_components: bool = False,
    ) -> None:
        if not terms:
            raise ValueError("a RewardScorer needs at least one reward")
        self.terms = list(terms)
        self.timeout_s = timeout_s
        self.max_hung_calls = max_hung_calls
        self.named_components = named_components
        self.failures: Counter[tuple[str, str]] = Counter()
        """Samples failed so far, by (reward name, failure kind)."""
        self._hung: list[_CallThread] = []
        self._callers: dict[str, _CallThread] = {}  # reward name -> the thread that runs its calls under a deadline

    def score_batch(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[RewardResult]:
        """One result per sample, in order. Raises only when earlier calls hang (see ``reward.max_hung_calls``)."""
        count = len(responses)
        if not len(prompts) == len(metadata) == count:
            raise ValueError(f"score_batch: {len(prompts)} prompts, {count} responses, {len(metadata)} metadata")
        self._check_hung()
        totals, errors = [0.0] * count, [None] * count
        components: list[dict[str, float]] = [{} for _ in range(count)]
        for term in self.terms:
            for index, outcome in enumerate(self._evaluate(term, prompts, responses, metadata)):
                if isinstance(outcome, BaseException):
                    errors[index] = errors[index] or _kind(outcome)
                    continue
                value, parts = outcome
                totals[index] += term.weight * value
                components[index].update(self._component_names(term, value, parts))
        results = []
        for total, error, parts in zip(totals, errors, components, strict=True):
            if error is None and not math.isfinite(total):  # finite parts whose weighted sum overflows
                overflow = NonFiniteReward(f"the weighted sum is {total}")
                self._record_failure("sum", overflow, 1)
                error = _kind(overflow)
            results.append(RewardResult(0.0 if error else total, error is not None, parts, error))
        return results

    def score_one(self, prompt: str, response: str, metadata: Mapping[str, Any]) -> RewardResult:
        return self.score_batch([prompt], [response], [metadata])[0]

    def _evaluate(self, term: RewardTerm, prompts, responses, metadata) -> list[tuple[float, dict] | Exception]:
        """``(value, components)`` per sample, or the exception with which this reward failed it."""
        if is_batched(term.fn):
            try:
                values = _as_batch(self._call(term, list(prompts), list(responses), [dict(m) for m in metadata]))
                if len(values) != len(responses):
                    raise ValueError(f"returned {len(values)} rewards for a batch of {len(responses)}")
            except Exception as err:  # noqa: BLE001 - a user's reward code may raise anything: the batch fails
                self._record_failure(term.name, err, len(responses))
                return [err] * len(responses)
            return [self._checked(term, value) for value in values]
        outcomes = []
        calls = [
            ((prompt, response), dict(meta))
            for prompt, response, meta in zip(prompts, responses, metadata, strict=True)
        ]
        for value in self._call_each(term, calls):
            if isinstance(value, Exception):  # a user's reward code may raise anything: the sample fails
                self._record_failure(term.name, value, 1)
                outcomes.append(value)
                continue
            outcomes.append(self._checked(term, value))
        return outcomes

    def _call_each(self, term: RewardTerm, calls: list[tuple[tuple, dict]]) -> list[Any]:
        """Each call's value or the ``Exception`` it raised (a timeout: ``RewardTimeout``), in order; with
        ``timeout_s`` set, in a daemon thread with a deadline per call (``_CallThread.call_each``)."""
        if self.timeout_s <= 0:
            return [_outcome(term.fn, args, kwargs) for args, kwargs in calls]
        results: list[Any] = []
        while len(results) < len(calls):
            caller = self._callers.get(term.name)
            if caller is None:
                caller = self._callers[term.name] = _CallThread(f"reward-{term.name}")
            outcomes, taken = caller.call_each(term.fn, calls[len(results) :], self.timeout_s)
            for outcome in outcomes:
                if not isinstance(outcome.get("error", Exception()), Exception):
                    raise outcome["error"]  # KeyboardInterrupt and the like are no reward failure
                results.append(outcome["value"] if "value" in outcome else outcome["error"])
            if taken > len(outcomes):
                # The thread stays busy with the hung call (and exits after it); later calls get a new one.
                del self._callers[term.name]
                self._hung.append(caller)
                timeout = RewardTimeout(
                    f"ran past reward.timeout_s={self.timeout_s:g}s; the call goes on in the background"
                )
                results.extend([timeout] * (taken - len(outcomes)))
        return results

    def _checked(self, term: RewardTerm, value: object) -> tuple[float, dict] | Exception:
        try:
            return normalize(value)
        except Exception as err:  # noqa: BLE001 - a returned object's __float__ may raise anything
            self._record_failure(term.name, err, 1)
            return err

    def _call(self, term: RewardTerm, *args: Any, **kwargs: Any) -> Any:
        """``term.fn(*args, **kwargs)``, in a daemon thread with a deadline when ``timeout_s`` is set."""
        if self.timeout_s <= 0:
            return term.fn(*args, **kwargs)
        (result,) = self._call_each(term, [(args, kwargs)])
        if isinstance(result, Exception):
            raise result
        return result

    def _check_hung(self) -> None:
        self._hung = [caller for caller in self._hung if caller.busy()]
        if len(self._hung) >= self.max_hung_calls:
            names = sorted({caller.name.removeprefix("reward-") for caller in self._hung})
            raise RuntimeError(
                f"{len(self._hung)} calls of reward {', '.join(names)} are still running past "
                f"reward.timeout_s={self.timeout_s:g}s: the reward hangs. Fix it, or raise reward.timeout_s "
                f"or reward.max_hung_calls={self.max_hung_calls}"
            )

    def _record_failure(self, name: str, err: BaseException, samples: int) -> None:
        kind = _kind(err)
        first = (name, kind) not in self.failures
        self.failures[name, kind] += samples
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "reward %r failed with %s on %d sample(s), marked failed: %s%s",
            name,
            kind,
            samples,
            err,
            f" (further {kind} failures of this reward are counted, not logged)" if first else "",
        )

    def _component_names(self, term: RewardTerm, value: float, parts: dict[str, float]) -> dict[str, float]:
        if not self.named_components:
            return parts
        return {term.name: value, **{f"{term.name}/{key}": part for key, part in parts.items()}}


def _outcome(fn: RewardFn, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``, or the ``Exception`` it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a user's reward code may raise anything: the caller marks it failed
        return err


def _kind(err: BaseException) -> str:
    """A failure's kind as logs and metrics name it: the exception's type name (``RewardTimeout``, ...)."""
    return type(err).__name__


def normalize(value: object) -> tuple[float, dict[str, float]]:
    """``(reward, components)`` of one returned value; TypeError for a wrong type, NonFiniteReward for NaN/inf."""
    if isinstance(value, Mapping):
        if not value:
            raise TypeError("returned an empty dict; expected named floats")
        parts = {}
        for key, part in value.items():
            if not isinstance(key, str):
                raise TypeError(f"returned a dict with the key {key!r}; component names are strings")
            parts[key] = _finite(_as_float(part), key)
        total = parts.pop(TOTAL) if TOTAL in parts else sum(parts.values())
        return _finite(total, TOTAL), parts
    return _finite(_as_float(value), None), {}


def _as_float(value: object) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        raise TypeError(f"returned {type(value).__name__}; expected a float or a dict of floats")
    return float(value)


def _finite(value: float, key: str | None) -> float:
    if not math.isfinite(value):
        raise NonFiniteReward(f"returned {value}" + (f" for {key!r}" if key is not None else ""))
    return value


def _as_batch(values: object) -> list:
    """A batched reward's return as a list: a list or tuple, or a 1-d array or tensor (whose items are 0-d)."""
    if isinstance(values, (str, bytes, Mapping)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        raise TypeError(f"a batched reward returned {type(values).__name__}; expected a list")
    return list(values)


def score(fn: RewardFn, prompt: str, response: str, metadata: Mapping[str, Any]) -> tuple[float, bool]:
    """``(reward, failed)`` of one sample under the fault boundary, with no deadline."""
    name = getattr(fn, "__name__", type(fn).__name__)
    result = RewardScorer([RewardTerm(name, fn)]).score_one(prompt, response, metadata)
    return result.reward, result.failed
