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
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["run.steps"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["run.steps=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
