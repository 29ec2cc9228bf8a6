"""Shared fixtures (keep this small: helpers specific to one package live in its tests)."""

from __future__ import annotations

import pytest


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
