"""The harness' pieces that need no engine: the app bundle and result verification."""

from __future__ import annotations

import io
import tomllib
import zipfile

import pytest
import torch
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config

from medgen.config import RunConfig
from medgen.server.checkpoint import new_checkpoint, save_checkpoint
from medgen.server.run_log import RunDir
from medgen.server.simulate import SimulationError, verify_results, write_app_dir


def test_app_dir_carries_the_full_run_config_and_ships_only_the_shim(tmp_path):
    config = RunConfig(num_rounds=3, sites="A,B", data_root="/data/x y", options={"gen-width": 8})
    app_dir = write_app_dir(config, tmp_path / "app")
    (app_dir / "stray_module.py").write_text("raise SystemExit('must not ship')\n")
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=False)
    assert ok, errors
    flat = pyproject["tool"]["flwr"]["app"]["config"]
    options = flat.pop("options")
    assert RunConfig.from_run_config({**flat, **{f"options.{k}": v for k, v in options.items()}}) == config
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))).namelist())
    shipped = {n for n in names if not n.startswith(".info/")}
    assert shipped == {"pyproject.toml", "medgen_flower_shim.py"}
    shim = (app_dir / "medgen_flower_shim.py").read_text()
    assert "server_app = _server.app" in shim and "def " not in shim  # no logic in the bundle


def _run_dir(tmp_path, status="ok", train_lines=()):
    run_dir = RunDir(tmp_path)
    config = RunConfig(sites="A,B")
    for line in train_lines:
        run_dir.log_train(**line)
    save_checkpoint(tmp_path, new_checkpoint({"gen.w": torch.ones(1)}, 2, config, "k"))
    run_dir.write_done(status, error="boom" if status != "ok" else None)
    return run_dir, config


def test_verify_rejects_a_run_where_every_client_failed(tmp_path):
    # `flwr run` exits 0 in this case: the harness must notice on its own
    excluded = [{"site": "A", "reason": "training failed"}, {"site": "B", "reason": "training failed"}]
    run_dir, config = _run_dir(tmp_path, train_lines=[
        dict(server_round=1, per_site={}, excluded=excluded, aggregate={})])
    with pytest.raises(SimulationError, match="every ClientApp failed"):
        verify_results(run_dir, run_dir.read_done(), config, 1.0)


def test_verify_reports_server_failure_and_accepts_a_good_run(tmp_path):
    run_dir, config = _run_dir(tmp_path / "bad", status="failed")
    with pytest.raises(SimulationError, match="boom"):
        verify_results(run_dir, run_dir.read_done(), config, 1.0)
    good, config = _run_dir(tmp_path / "good", train_lines=[
        dict(server_round=1, per_site={"A": {"epsilon": 1.0}}, excluded=[], aggregate={})])
    assert verify_results(good, good.read_done(), config, 1.0).final_round == 2
