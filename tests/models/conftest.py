"""Helpers shared by the recipe tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def simulate():
    """Run `medgen-server simulate` for real (Flower's simulation engine, a subprocess) on a
    data root with ``--set`` settings; assert it succeeded; return the run's per-round
    "train" records from metrics.jsonl. ``simulate-actors=1`` unless the settings name it:
    one Ray actor trains the sites in turn (tests/conftest.py says why)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def run(data_root: Path, out: Path, settings: list[str], timeout: int) -> list[dict]:
        cli = Path(sys.executable).parent / "medgen-server"
        if not any(s.startswith("simulate-actors=") for s in settings):
            settings = [*settings, "simulate-actors=1"]
        done = subprocess.run([str(cli), "simulate", "--data-root", str(data_root), "--out", str(out),
                               "--timeout", str(timeout), *[a for s in settings for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=timeout + 100)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r.get("kind") == "train"]

    return run
