"""The typed configuration: YAML, dotted overrides and clear errors."""

import pytest

from sera_ray.config import ConfigError, load_config


def test_yaml_and_dotted_overrides_combine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  beta: 0.5\n  loss: ipo\nsera:\n  iterations: 2\n")

    config = load_config(path, ["trainer.beta=0.1", "selection.top_fraction=0.5"])

    assert config.trainer.beta == 0.1
    assert config.trainer.loss == "ipo"
    assert config.sera.iterations == 2
    assert config.selection.top_fraction == 0.5


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(ConfigError, match="trainer.betta"):
        load_config(None, ["trainer.betta=0.1"])


def test_bad_value_names_its_dotted_path():
    with pytest.raises(ConfigError, match="trainer.zero_stage"):
        load_config(None, ["trainer.zero_stage=7"])


def test_selection_needs_exactly_one_rule():
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, ["selection.threshold=0.2"])

    config = load_config(None, ["selection.threshold=0.2", "selection.top_fraction=null"])

    assert config.selection.threshold == 0.2


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["trainer.beta"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["model.policy=/models/sft", "bootstrap.candidates=mixed"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())

    again = load_config(path)

    assert again == config
    assert again.reference_path == "/models/sft"
