"""The coordinator's held-out data, arranged for like-for-like generator evaluation.

``heldout/fit`` trains the evaluation networks; ``heldout/test`` is the reference for
every reported number (docs/data-layout.md). Each test site is split by SUBJECT into two
disjoint halves (alternating in subject order):

- the conditioning half: its label maps condition the generator, and its real images
  are the "perfect generator" stand-in for the real-vs-real floor;
- the reference half: real images every FD/KID is measured against.

So ``fd/<site>`` = FD(G(maps of half 1), real half 2) and ``fd_floor/<site>`` =
FD(real half 1, real half 2), at the same N and on the same anatomy: the floor is what a
generator that reproduced the real scans exactly would score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medgen.data.site_data import HeldoutSite, load_heldout
from medgen.evaluation.hashing import state_dict_sha256, tensors_sha256  # noqa: F401 (re-exported)


class HeldoutDataError(ValueError):
    """Held-out data is missing a site or too small to evaluate; the message says which."""


@dataclass(frozen=True)
class SplitSite:
    """One site of heldout/test, split by subject."""

    cond_images: torch.Tensor   # [n1,1,H,W] real images of the conditioning half
    cond_labels: torch.Tensor   # [n1,H,W] their label maps (generator conditioning)
    ref_images: torch.Tensor    # [n2,1,H,W] real images of the reference half
    ref_labels: torch.Tensor    # [n2,H,W] their label maps (per-tissue intensity metrics)


def load_split(heldout_root: Path, split: str, image_size: int, sites: tuple[str, ...],
               cache_dir: Path | None) -> dict[str, HeldoutSite]:
    """``load_heldout`` restricted to the run's sites, in run order; a missing site is an error."""
    loaded = load_heldout(heldout_root, split, image_size, cache_dir=cache_dir)
    missing = [s for s in sites if s not in loaded]
    if missing:
        raise HeldoutDataError(
            f"{heldout_root}: held-out split '{split}' has no data for site(s) {', '.join(missing)} "
            f"(found {', '.join(sorted(loaded)) or 'none'}); the run's sites must all have "
            f"heldout/{split}/<site>/ folders, or set eval-every=0 to disable evaluation")
    return {s: loaded[s] for s in sites}


def split_by_subject(site: str, data: HeldoutSite) -> SplitSite:
    order = list(dict.fromkeys(data.subjects))  # unique subjects, first-seen order
    if len(order) < 4:
        raise HeldoutDataError(f"held-out test site '{site}' has {len(order)} subjects; at least 4 "
                               f"are needed to form two halves of 2 (build more held-out subjects)")
    cond_subjects = set(order[0::2])
    in_cond = torch.tensor([s in cond_subjects for s in data.subjects])
    return SplitSite(cond_images=data.images[in_cond], cond_labels=data.labels[in_cond],
                     ref_images=data.images[~in_cond], ref_labels=data.labels[~in_cond])
