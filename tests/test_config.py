"""RunConfig: the one typed config round-trips through Flower's flat run config and TOML."""

import pytest

from medgen.config import ConfigError, RunConfig, parse_overrides


def test_round_trip_through_flower_run_config():
    config = RunConfig(num_rounds=3, target_epsilon=4.5, sites="A,B,C", options={"gen-width": 48})
    flat = config.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["num-rounds"] == 3 and flat["options.gen-width"] == 48
    assert RunConfig.from_run_config(flat) == config


def test_toml_file_with_overrides(tmp_path):
    config = RunConfig(num_rounds=7, options={"loss": "hinge"})
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    loaded = RunConfig.from_toml(path, parse_overrides(["num-rounds=2", "accountant=rdp"]))
    assert loaded == config.replace(num_rounds=2, accountant="rdp")


@pytest.mark.parametrize("key,value,needle", [
    ("num-rounds", 0, "num-rounds"),
    ("accountant", "gdp", "accountant"),
    ("delta", 2.0, "delta"),
    ("image-size", 50, "image-size"),
    ("sites", "A,A", "sites"),
    ("num-rounds", "three", "num-rounds"),
])
def test_bad_fields_are_named(key, value, needle):
    flat = RunConfig().to_run_config()
    flat[key] = value
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config(flat)


def test_unknown_key_is_refused_with_the_known_keys():
    with pytest.raises(ConfigError, match="unknown run-config key 'num-round'.*num-rounds"):
        RunConfig.from_run_config({"num-round": 3})


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="broken.toml"):
        RunConfig.from_toml(path)
