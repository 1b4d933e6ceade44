from pathlib import Path

import pytest

from asyncrl.config import ConfigError, load_config, to_yaml

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.samples_per_step == cfg.trainer.prompts_per_step * cfg.rollout.group_size
    assert cfg.run.dir.startswith("runs/")  # interpolation resolved


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["run.steps=7", "trainer.lr=3e-5", "store.appendonly=true"])
    assert (cfg.run.steps, cfg.trainer.lr, cfg.store.appendonly) == (7, 3e-5, True)


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.gruop_size=3"])
    message = str(err.value)
    assert "rollout.gruop_size" in message and "did you mean 'rollout.group_size'" in message
    assert "max_new_tokens" in message  # lists what is allowed


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="trainer.learning_rate"):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("rollout.group_size=abc", "rollout.group_size"),
        ("scheduler.max_staleness=-1", "scheduler.max_staleness must be >= 0, got -1"),
        ("scheduler.on_stale=wait", "drop, regenerate"),
        ("trainer.zero_stage=3", "trainer.zero_stage"),
        ("store.url=http://x", "store.url"),
        ("trainer.micro_batch_size=5", "must divide"),
        ("rollout.inflight_budget_s=-1", "rollout.inflight_budget_s must be >= 0, got -1.0"),
        ("rollout.debug_token_delay_s=[-0.1]", "rollout.debug_token_delay_s must hold seconds >= 0"),
        ("rollout.debug_token_delay_s=0.1", "rollout.debug_token_delay_s"),
        ("rollout.debug_token_delay_s=[0.1,0.5]", "rollout.debug_token_delay_s has 2 entries for 1 rollout workers"),
        ("sync.recompute_kv=maybe", "sync.recompute_kv"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_a_reward_stage_refuses_episodes_their_environment_scores():
    with pytest.raises(ConfigError, match=r"stages\.reward=true cannot score rollout\.env='calculator' episodes"):
        load_config(CONFIGS / "tiny.yaml", ["stages.reward=true", "rollout.env=calculator"])
    assert load_config(CONFIGS / "tiny.yaml", ["stages.reference=true", "rollout.env=calculator"]).stages.reference


def test_stage_batch_size_names_the_key():
    with pytest.raises(ConfigError, match=r"stages\.batch_size must be >= 1, got 0"):
        load_config(CONFIGS / "tiny.yaml", ["stages.batch_size=0"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["run.steps"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["run.steps=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.advantage=ppo", "trainer.advantage must be one of grpo, dr_grpo, rloo, reinforce_pp; got 'ppo'"),
        ("trainer.loss=grpo", "trainer.loss must be one of ppo_clip, decoupled_ppo, tis, ratio_mask; got 'grpo'"),
        ("trainer.loss_agg=mean", "trainer.loss_agg must be one of token_mean, seq_mean_token_sum, "),
        ("trainer.kl_estimator=k4", "trainer.kl_estimator must be one of k1, k2, k3; got 'k4'"),
        ("trainer.clip_eps_low=1.0", "trainer.clip_eps_low must be in (0, 1), got 1.0"),
        ("trainer.clip_eps_low=0", "trainer.clip_eps_low must be in (0, 1), got 0"),
        ("trainer.clip_eps_high=-0.1", "trainer.clip_eps_high must be > 0, got -0.1"),
        ("trainer.dual_clip=0.5", "trainer.dual_clip must be 0 (off) or > 1, got 0.5"),
        ("trainer.tis_cap=0.5", "trainer.tis_cap must be 0 (no truncation) or >= 1"),
        ("trainer.ratio_band_low=1.5", "trainer.ratio_band_low and trainer.ratio_band_high must satisfy"),
        ("trainer.ratio_band_high=0.9", "trainer.ratio_band_low and trainer.ratio_band_high must satisfy"),
        ("trainer.kl_coef=-0.1", "trainer.kl_coef must be >= 0 (0 is off), got -0.1"),
        ("trainer.overlong_buffer=-1", "trainer.overlong_buffer must be >= 0 (0 is off), got -1"),
        ("trainer.overlong_penalty=0", "trainer.overlong_penalty must be > 0, got 0"),
        ("trainer.filter_equal_groups=maybe", "trainer.filter_equal_groups"),
    ],
)
def test_bad_algorithm_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert fragment in str(err.value)


def test_algorithm_names_are_validated_against_the_registry():
    from asyncrl.algorithms.registry import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

    for key, names in [
        ("advantage", ADVANTAGES),
        ("loss", POLICY_LOSSES),
        ("loss_agg", LOSS_AGGREGATIONS),
        ("kl_estimator", KL_ESTIMATORS),
    ]:
        for name in names:
            assert getattr(load_config(None, [f"trainer.{key}={name}"]).trainer, key) == name


def test_config_validation_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, asyncrl.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_default_trainer_builds_the_original_loss_and_scoring():
    from asyncrl.algorithms.loss import LossConfig
    from trainers.batch import Scoring
    from trainers.worker import build_loss_config, build_scoring

    cfg = load_config(CONFIGS / "tiny.yaml")

    assert (cfg.trainer.advantage, cfg.trainer.loss) == ("grpo", "ppo_clip")
    assert build_loss_config(cfg) == LossConfig(max_response_len=cfg.rollout.max_new_tokens)
    assert build_scoring(cfg) == Scoring(max_response_len=cfg.rollout.max_new_tokens)


def test_clip_eps_sets_both_sides_unless_one_is_given():
    from trainers.worker import build_loss_config

    symmetric = build_loss_config(load_config(None, ["trainer.clip_eps=0.3"]))
    assert (symmetric.clip_eps_low, symmetric.clip_eps_high) == (0.3, 0.3)
    higher = build_loss_config(load_config(None, ["trainer.clip_eps=0.2", "trainer.clip_eps_high=0.28"]))
    assert (higher.clip_eps_low, higher.clip_eps_high) == (0.2, 0.28)
    lower = build_loss_config(load_config(None, ["trainer.clip_eps_low=0.1"]))
    assert (lower.clip_eps_low, lower.clip_eps_high) == (0.1, 0.2)


def test_overlong_buffer_longer_than_the_responses_is_refused():
    from trainers.worker import build_scoring

    cfg = load_config(CONFIGS / "tiny.yaml", ["trainer.overlong_buffer=17"])  # rollout.max_new_tokens is 16
    with pytest.raises(ConfigError, match=r"trainer.overlong_buffer \(17\) must be <= rollout.max_new_tokens \(16\)"):
        build_scoring(cfg)
    assert build_scoring(load_config(CONFIGS / "tiny.yaml", ["trainer.overlong_buffer=16"])).overlong_buffer == 16
