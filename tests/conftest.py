"""Shared fixtures (keep this small: helpers specific to one package live in its tests).

Flower simulations in tests run with ``simulate-actors=1`` (Flower's init-args-num-cpus): one
Ray actor trains the sites in turn. Each actor is a process that imports Ray, torch and
medgen before its first round: ~18 s of CPU, a quarter of a tiny run's (measured: 75 s of
CPU for the process tree of a 2-site, 2-round run with 2 actors, 58 s with 1). What the
tests assert (rounds, per-site replies and epsilons, ledgers, messages) is per node and
does not depend on how many nodes train at once; one actor serving every node is also the
stricter check that no state leaks between sites through a process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (2 shared cores, several xdist workers), restored after;
    files use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


# The files that ran longest in `make test` (seconds in one worker, summed over the file's
# tests), longest first: each starts at once instead of ending the run alone.
LONGEST_FIRST = ("tests/deploy/test_e2e.py",                  # ~610
                 "tests/models/test_cddpm.py",                # ~400
                 "tests/server/test_coordinator_kill.py",     # ~270
                 "tests/models/test_flower_label_schema.py")  # ~270


def pytest_collection_modifyitems(session, config, items):
    """LONGEST_FIRST, then the other files with slow tests (Flower engines, long training),
    then the rest; each file's tests in their own order. `make test` hands whole files to
    its xdist workers in this order (--no-loadscope-reorder: xdist otherwise reorders files
    by their number of tests, which put the 3-test end-to-end file near the end)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple:
        relative = item.path.relative_to(config.rootpath).as_posix()
        first = LONGEST_FIRST.index(relative) if relative in LONGEST_FIRST else len(LONGEST_FIRST)
        return (first, item.path not in slow)

    items.sort(key=rank)  # stable: a file's tests stay together and in their order
