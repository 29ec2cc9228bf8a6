"""The public anatomy bank: label maps anyone may use, read by the same walk as a site.

``<public_dir>/labels/`` (or ``public_dir`` itself) holds tissue label maps only. They
are listed by data/site_folder.py (no links followed, regular files only, unreadable
files skipped and named), checked as label maps and resized nearest-neighbour. A bad map
is skipped with its reason; only a bank with nothing usable raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import load_manifest
from medgen.data.preprocess import check_labels, square_resize
from medgen.data.readers import Reader, ReaderError, SkippedFile, default_readers
from medgen.data.site_folder import SiteFolder
from medgen.data.site_records import SiteDataError, SkipLog, claimed_entries, read_outcomes
from medgen.models.recipe import PublicData

__all__ = ["load_public_bank"]


def load_public_bank(public_dir: str | Path, image_size: int,
                     readers: Sequence[Reader] | None = None,
                     schema: LabelSchema | None = None) -> PublicData:
    """Label maps of the public bank (``<public_dir>/labels`` or ``public_dir`` itself), as
    class indices of ``schema`` (default: the bank's own dataset.toml [labels], else the
    federation root's, else the brain default); a value outside it skips the map, named."""
    public_dir = Path(public_dir)
    if schema is None and public_dir.is_dir():
        root = public_dir.parent if public_dir.name == "public" else None
        schema = load_manifest(public_dir, root=root).labels
    if not public_dir.is_dir():
        raise SiteDataError(f"{public_dir}: no public label maps (expected {public_dir}/labels/)")
    readers = list(readers) if readers is not None else default_readers()
    top = "labels" if (public_dir / "labels").is_dir() and not (public_dir / "labels").is_symlink() else "."
    folder = SiteFolder.scan(public_dir, (top,))
    skips = SkipLog(public_dir)
    for rel, reason in folder.skipped:
        skips.add(public_dir / rel, reason)
    maps = []
    for rel, reader in claimed_entries(folder, top, readers, skips):
        for outcome in read_outcomes(public_dir / rel, reader):
            if isinstance(outcome, SkippedFile):
                skips.add(outcome.path, outcome.reason)
                continue
            try:
                indices = check_labels(outcome.array, None, skips.relative(outcome.source), schema)
            except ReaderError as err:
                skips.add(outcome.source, str(err))
                continue
            maps.append(square_resize(indices, image_size, outcome.spacing, "label"))
    if not maps:
        reasons = "\n  ".join(s.reason for s in skips.items) or "the folder holds no files"
        where = public_dir / top if top != "." else public_dir
        raise SiteDataError(f"{where}: no usable public label maps; reasons:\n  {reasons}")
    return PublicData(label_maps=torch.cat(maps))
