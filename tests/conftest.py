"""Shared fixtures (keep this small: helpers specific to one package live in its tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from medgen.server.processes import environment, scan


def processes_of_run(run_dir: Path) -> list[int]:
    """PIDs started for a simulated run: every process the harness spawns inherits
    FLWR_HOME=<run dir>/flower/home (server/simulate.py)."""
    marker = f"FLWR_HOME={Path(run_dir) / 'flower' / 'home'}"
    return [pid for pid in scan() if pid != os.getpid() and marker in environment(pid)]


@pytest.fixture
def flower_processes():
    """``processes_of_run`` for tests that assert a run left nothing behind."""
    return processes_of_run


@pytest.fixture
def run_dir(tmp_path):
    """A run directory for ``medgen-server simulate``; whatever the run started and left
    running is killed by PID afterwards (a safety net: the harness stops its own)."""
    out = tmp_path / "run"
    yield out
    for pid in processes_of_run(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def flower_task_identity(monkeypatch):
    """Flower builds outgoing Messages from the identity of the running task (run, node,
    task ids), which only a real runtime sets. Tests that build Messages outside one set
    it here; monkeypatch restores it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    return TaskIdentity


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory):
    """A 2-site simulated federation at 32 px with a handful of subjects (built once)."""
    import torch

    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("federation") / "data"
    build_federation(SimConfig(seed=0, sites="A,B", subjects_per_site=8, public_size=8,
                               heldout_fit=6, heldout_test=6, image_size=32), root)
    return root


def pytest_collection_modifyitems(session, config, items):
    """Files with slow tests (Flower engines, long training) first, each file's tests in their
    own order: `make test` hands whole files to 3 xdist workers in collection order, so the
    long files start at once instead of one of them ending the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within a file kept
