"""Build a folder atomically: write into a sibling staging folder, then rename it into place.

A crash or a refusal mid-build leaves the old folder (or nothing), never a half-built one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield a fresh sibling folder of ``out``; on success it replaces ``out``, else it goes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        yield staging
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` over ``out`` (an existing ``out`` is moved aside, then removed)."""
    if not out.exists():
        os.replace(staging, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / "old")
    os.replace(staging, out)
    shutil.rmtree(trash, ignore_errors=True)
