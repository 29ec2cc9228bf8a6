"""RunConfig: the one typed config round-trips through Flower's flat run config and TOML,
and refuses, naming the key, every value out of range or inconsistent with the others."""

import math

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


# every numeric field: non-finite, out of range, or inconsistent with another field
BAD_VALUES = [
    ("target-epsilon", math.inf, "target-epsilon"),      # the noise would calibrate to nothing
    ("target-epsilon", math.nan, "target-epsilon"),
    ("target-epsilon", 0.0, "target-epsilon"),
    ("target-epsilon", -1.0, "target-epsilon"),
    ("target-epsilon", "inf", "target-epsilon"),         # a string from --set parses to inf
    ("delta", math.nan, "delta"),
    ("delta", 0.0, "delta"),
    ("delta", 1.0, "delta"),
    ("max-grad-norm", math.inf, "max-grad-norm"),
    ("max-grad-norm", math.nan, "max-grad-norm"),
    ("max-grad-norm", 0.0, "max-grad-norm"),
    ("round-timeout", -1.0, "round-timeout"),
    ("round-timeout", 0.0, "round-timeout"),
    ("round-timeout", math.nan, "round-timeout"),
    ("round-timeout", math.inf, "round-timeout"),
    ("min-sites", 5, "min-sites"),                        # above the 4 default sites
    ("min-sites", 0, "min-sites"),
    ("eval-samples", -1, "eval-samples"),
    ("eval-samples", 1, "eval-samples"),                  # evaluation on: a distance needs 2
    ("eval-every", -1, "eval-every"),
    ("local-steps", 0, "local-steps"),
    ("batch-size", 0, "batch-size"),
    ("seed", -1, "seed"),
    ("trim-fraction", math.nan, "trim-fraction"),
    ("norm-outlier-mads", math.inf, "norm-outlier-mads"),
    ("norm-outlier-mads", -1.0, "norm-outlier-mads"),
    ("client-dp-noise-multiplier", math.inf, "client-dp-noise-multiplier"),
    ("client-dp-noise-multiplier", -0.5, "client-dp-noise-multiplier"),
    ("client-dp-clipping-norm", math.nan, "client-dp-clipping-norm"),
    ("secagg-max-dropped", -1, "secagg-max-dropped"),
    ("options.gen-lr", math.nan, "options.gen-lr"),
]


@pytest.mark.parametrize("key,value,needle", BAD_VALUES)
def test_every_numeric_field_is_validated_and_named(key, value, needle):
    flat = RunConfig().to_run_config()
    flat[key] = value
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config(flat)


@pytest.mark.parametrize("changes,needle", [
    ({"sites": "A,B", "min-sites": 3}, "min-sites"),
    ({"secure-aggregation": True, "sites": "A,B", "min-sites": 2}, "at least 3 sites"),
    ({"secure-aggregation": True, "sites": "A,B,C,D", "secagg-max-dropped": 2}, "secagg-max-dropped"),
    ({"eval-every": 0, "eval-samples": -3}, "eval-samples"),
])
def test_inconsistent_fields_are_refused(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({**RunConfig().to_run_config(), **changes})


def test_edge_values_that_are_fine():
    assert RunConfig(eval_every=0, eval_samples=0).eval_samples == 0      # evaluation off
    assert RunConfig(sites="A,B", min_sites=2).min_sites == 2
    assert RunConfig(secure_aggregation=True, sites="A,B,C,D,E", secagg_max_dropped=2)


def test_overrides_from_the_command_line_are_validated():
    # --set target-epsilon=inf parses as a TOML float inf: refused, not silently unbounded
    with pytest.raises(ConfigError, match="target-epsilon"):
        RunConfig.from_run_config(parse_overrides(["target-epsilon=inf"]))
    with pytest.raises(ConfigError, match="round-timeout"):
        RunConfig.from_run_config(parse_overrides(["round-timeout=-1"]))


def test_unknown_key_is_refused_with_the_known_keys():
    with pytest.raises(ConfigError, match="unknown run-config key 'num-round'.*num-rounds"):
        RunConfig.from_run_config({"num-round": 3})


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="broken.toml"):
        RunConfig.from_toml(path)


# -- node settings (client/node.py, client/cli.py): the site's own cap, checked at the edge --
def _deployed_node(**extra):
    return {"site": "A", "data-dir": "/d", "state-dir": "/s", "public-dir": "/p", **extra}


@pytest.mark.parametrize("cap", [math.nan, math.inf, -math.inf, 0.0, -1.0, "3", True])
def test_node_epsilon_cap_must_be_finite_and_positive(cap):
    from medgen.client.node import resolve_node

    with pytest.raises(ConfigError, match="epsilon-cap"):
        resolve_node(RunConfig(), _deployed_node(**{"epsilon-cap": cap}))


def test_node_epsilon_cap_tightens_the_target_and_is_optional():
    from medgen.client.node import resolve_node

    assert resolve_node(RunConfig(), _deployed_node()).target_epsilon(RunConfig()) == 10.0
    node = resolve_node(RunConfig(), _deployed_node(**{"epsilon-cap": 3}))
    assert node.epsilon_cap == 3.0 and node.target_epsilon(RunConfig()) == 3.0


@pytest.fixture
def hospital_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "public").mkdir()
    (tmp_path / "ca.crt").write_text("ca")
    key = tmp_path / "site-a"
    key.write_text("key")
    key.chmod(0o600)
    return ["--server", "127.0.0.1:9092", "--data", str(tmp_path / "data"), "--state",
            str(tmp_path / "state"), "--key", str(key), "--ca", str(tmp_path / "ca.crt"), "--dry-run"]


@pytest.mark.parametrize("flags,needle", [
    (["--epsilon-cap", "nan"], "--epsilon-cap"),
    (["--epsilon-cap", "inf"], "--epsilon-cap"),
    (["--epsilon-cap", "0"], "--epsilon-cap"),
    (["--port", "0"], "--port"),
    (["--port", "70000"], "--port"),
    (["--max-retries", "-1"], "--max-retries"),
    (["--max-wait-time", "nan"], "--max-wait-time"),
    (["--max-wait-time", "-5"], "--max-wait-time"),
])
def test_client_command_line_numbers_are_refused_by_name(hospital_files, flags, needle, capsys):
    from medgen.client.cli import main

    assert main(hospital_files + flags) == 2
    assert needle in capsys.readouterr().err


def test_client_command_line_accepts_a_finite_cap(hospital_files, capsys):
    from medgen.client.cli import main

    assert main(hospital_files + ["--epsilon-cap", "3"]) == 0
    assert "epsilon cap 3.0" in capsys.readouterr().out
