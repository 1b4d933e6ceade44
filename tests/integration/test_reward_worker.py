"""reward.local_rm.worker=true: the sequence-classification reward model on a Ray actor of its own.

Real Ray (a local loopback session, as runs start it) and a tiny real reward model saved to a folder.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("ray")
pytest.importorskip("transformers")

from asyncrl.config import load_config  # noqa: E402
from asyncrl.rewards import LocalRewardModel, build_scorer  # noqa: E402
from asyncrl.rewards.reward_worker import REWARD_WORKER, RemoteRewardModel, start_reward_worker  # noqa: E402
from asyncrl.runtime import ray_session  # noqa: E402
from tests.unit.test_reward_models import _write_reward_model  # noqa: E402

PROMPTS, RESPONSES = ["1+1=", "2+2=", "3+3="], ["2", "five", "6 because 3 and 3"]


def test_rollout_rewards_come_from_the_reward_worker_and_a_dead_worker_fails_only_those_samples(tmp_path):
    import ray

    folder = _write_reward_model(tmp_path / "rm")
    overrides = ["reward.fn=local_rm", f"reward.local_rm.path={folder}", "reward.local_rm.worker=true"]
    cfg = load_config(None, [*overrides, "reward.local_rm.timeout_s=30", "run.num_cpus=1"])
    with ray_session(cfg):
        worker = start_reward_worker(cfg)
        assert worker is not None and ray.get(worker.ready.remote(), timeout=30) != os.getpid()  # its own process
        scorer = build_scorer(cfg.reward)
        assert isinstance(scorer.terms[0].fn, RemoteRewardModel)
        remote = scorer.score_batch(PROMPTS, RESPONSES, [{"answer": "2"}] * 3)
        local = LocalRewardModel.from_config(cfg.reward.local_rm)(PROMPTS, RESPONSES, [{}] * 3)
        assert [r.reward for r in remote] == pytest.approx(local, abs=1e-5) and not any(r.failed for r in remote)
        assert len(set(local)) == 3

        ray.kill(ray.get_actor(REWARD_WORKER))
        results = scorer.score_batch(PROMPTS, RESPONSES, [{"answer": "2"}] * 3)
        assert all(r.failed and r.reward == 0.0 for r in results)
        assert {r.error for r in results} <= {"ActorDiedError", "RayActorError", "ActorUnavailableError"}


def test_without_worker_true_no_reward_worker_is_started(tmp_path):
    cfg = load_config(None, ["reward.fn=local_rm", f"reward.local_rm.path={tmp_path}"])
    assert start_reward_worker(cfg) is None  # the rollout workers load the model in process
