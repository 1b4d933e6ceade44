"""Multi-turn rollouts: a rollout worker's engine drives an environment (``rollout.env``) turn by turn.

Each turn is one engine request. Its prompt is the episode so far, as tokens: the first context
(``env.reset``'s text, encoded like any prompt), then every earlier turn's sampled tokens and every
observation's tokens. When a turn finishes, its text goes to ``env.step``; unless the episode is
done, the observation's tokens are appended and the next turn is queued. The trajectory is one row:
``response_ids`` holds the turns and observations in order and ``loss_mask`` marks the sampled
tokens 1 and the observation tokens 0. Observation tokens get a 0.0 placeholder log-prob and the
version of the token sampled just before them: a re-prefilled token keeps the version that sampled
it, so ``version_start``/``version_end`` stay those of the sampled tokens. The episode's reward (the
sum of its step rewards) is the sample's reward; an environment whose ``step`` raises fails only
that sample (``reward_failed``, ``reward_error`` the exception's type name).

Request ids are ``<sample id>#<turn>``: the worker's ``<group id>:<j>`` sample id stays a prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncrl.envs import Environment
from asyncrl.rewards import RewardResult

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One sample's episode: the environment, the tokens so far and what the trainer needs of them."""

    env: Environment
    prompt_ids: list[int]
    max_new_tokens: int
    started_at: float = field(default_factory=time.perf_counter)
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turns: int = 0
    reward: float = 0.0
    error: str | None = None

    def append(self, ids: list[int], logprobs: list[float], versions: list[int], sampled: bool) -> None:
        self.response_ids.extend(ids)
        self.logprobs.extend(logprobs)
        self.token_versions.extend(versions)
        self.loss_mask.extend([int(sampled)] * len(ids))


@dataclass
class FinishedEpisode:
    """A whole episode as the worker turns it into a trajectory row (``FinishedSequence``'s fields and more)."""

    request_id: str  # the sample id
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    token_versions: list[int]
    loss_mask: list[int]
    finish_reason: str  # "stop" (the environment ended it) | "max_turns" | "length" (the context is full)
    gen_seconds: float
    turns: int
    scored: RewardResult


class MultiTurnDriver:
    """Runs episodes on ``engine`` (a ``GenerationEngine``): ``start`` one per sample, feed it every finished request."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        env_factory: Callable[[], Environment],
        *,
        max_turns: int,
        max_model_len: int,
        encode_prompt: Callable[[str], list[int]],
        sampling: Mapping[str, float],
    ) -> None:
        self.engine, self.tokenizer, self.env_factory = engine, tokenizer, env_factory
        self.max_turns, self.max_model_len = max_turns, max_model_len
        self.encode_prompt = encode_prompt
        self.sampling = dict(sampling)  # temperature, top_p
        self.episodes: dict[str, Episode] = {}

    def start(self, sample_id: str, prompt: str, metadata: Mapping[str, Any], max_new_tokens: int) -> None:
        """Reset a fresh environment on ``prompt`` and queue the first turn (an error in ``reset`` propagates)."""
        env = self.env_factory()
        context = env.reset(prompt, **dict(metadata))
        episode = Episode(env, self.encode_prompt(context), max_new_tokens)
        self.episodes[sample_id] = episode
        self._queue(sample_id, episode)

    def advance(self, seq: Any) -> FinishedEpisode | None:
        """Take one finished turn (a ``FinishedSequence``); the whole episode once it is over, else None."""
        sample_id = seq.request_id.rpartition("#")[0]
        episode = self.episodes[sample_id]
        episode.turns += 1
        episode.append(seq.response_ids, seq.logprobs, seq.token_versions, sampled=True)
        if seq.finish_reason == "abort":
            return self._finish(sample_id, "abort")
        text = self.tokenizer.decode(seq.response_ids, skip_special_tokens=True)
        try:
            observation, reward, done = episode.env.step(text)
            episode.reward += float(reward)
        except Exception as err:  # noqa: BLE001 - a user's environment may raise anything: the sample fails
            log.warning(
                "environment step failed with %s, sample %s marked failed: %s", type(err).__name__, sample_id, err
            )
            episode.error = type(err).__name__
            return self._finish(sample_id, "stop")
        if done:
            return self._finish(sample_id, "stop")
        if episode.turns >= self.max_turns:
            return self._finish(sample_id, "max_turns")
        ids = [int(i) for i in self.tokenizer(observation, add_special_tokens=False)["input_ids"]]
        if len(episode.prompt_ids) + len(episode.response_ids) + len(ids) >= self.max_model_len:
            return self._finish(sample_id, "length")  # no room for the observation and a token after it
        last = episode.token_versions[-1] if episode.token_versions else self.engine.version
        episode.append(ids, [0.0] * len(ids), [last] * len(ids), sampled=False)
        self._queue(sample_id, episode)
        return None

    def _queue(self, sample_id: str, episode: Episode) -> None:
        context = episode.prompt_ids + episode.response_ids
        room = self.max_model_len - len(context)
        self.engine.add_request(
            f"{sample_id}#{episode.turns}",
            context,
            max_new_tokens=max(1, min(episode.max_new_tokens, room)),
            **self.sampling,
        )

    def _finish(self, sample_id: str, reason: str) -> FinishedEpisode:
        episode = self.episodes.pop(sample_id)
        failed = episode.error is not None
        scored = RewardResult(0.0 if failed else episode.reward, failed, {}, episode.error)
        return FinishedEpisode(
            request_id=sample_id,
            prompt_ids=episode.prompt_ids,
            response_ids=episode.response_ids,
            logprobs=episode.logprobs,
            token_versions=episode.token_versions,
            loss_mask=episode.loss_mask,
            finish_reason=reason,
            gen_seconds=time.perf_counter() - episode.started_at,
            turns=episode.turns,
            scored=scored,
        )


def build_driver(cfg: Any, engine: Any, tokenizer: Any) -> MultiTurnDriver | None:
    """The driver of ``cfg.rollout.env`` for a worker's engine, or None for single-turn rollouts."""
    from asyncrl.data import encode_prompt
    from asyncrl.envs import load_environment

    rc = cfg.rollout
    if rc.env is None:
        return None
    return MultiTurnDriver(
        engine,
        tokenizer,
        load_environment(rc.env),
        max_turns=rc.max_turns,
        max_model_len=rc.max_model_len,
        encode_prompt=lambda text: encode_prompt(tokenizer, text, cfg.data),
        sampling={"temperature": rc.temperature, "top_p": rc.top_p},
    )
