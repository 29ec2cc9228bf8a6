"""``--fresh`` keeps the previous run: its results move to a named sibling directory.

What moves is everything a run writes into its run directory (checkpoint, metrics,
samples, privacy.json, report, the Flower logs) to ``RUN_DIR.prev-<YYYYmmdd-HHMMSS>``
beside it. What stays is what is not the run's result: the coordinator's lock and
records (``.coordinator``), the node state under RUN_DIR/state (the simulated sites'
privacy ledgers: a fresh run must not forget what each site already spent) and the
federation's data (RUN_DIR/federation, or wherever ``data-root`` points inside RUN_DIR).
``--delete-previous`` deletes the results instead of moving them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from medgen.server.run_lock import COORDINATOR_DIR


def previous_results(run_dir: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """The entries of ``run_dir`` that belong to the previous run's results."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        return []
    kept = {COORDINATOR_DIR}
    for path in keep:
        path = Path(path).resolve()
        if path == run_dir or run_dir in path.parents:
            relative = path.relative_to(run_dir).parts
            if relative:
                kept.add(relative[0])
    return sorted(entry for entry in run_dir.iterdir() if entry.name not in kept)


def set_aside(run_dir: Path, keep: tuple[Path, ...] = (), *, delete: bool = False) -> Path | None:
    """Move (or with ``delete``, remove) the previous run's results; returns where they went
    (None if there were none, or if they were deleted)."""
    run_dir = Path(run_dir).resolve()
    entries = previous_results(run_dir, keep)
    if not entries:
        return None
    if delete:
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{suffix}")
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)  # same parent file system: atomic per entry
    return target
