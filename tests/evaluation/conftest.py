"""Fixtures for the evaluation tests (helpers live in synthetic_heldout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic_heldout import write_heldout


@pytest.fixture(scope="session")
def heldout_root(tmp_path_factory) -> Path:
    return write_heldout(tmp_path_factory.mktemp("data"), n_fit=24, n_test=16)


@pytest.fixture
def dummy_model() -> torch.nn.Module:
    return torch.nn.Linear(1, 1)


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_torch_thread):
    """Every evaluation test on one torch thread (tests/conftest.py ``one_torch_thread``)."""
