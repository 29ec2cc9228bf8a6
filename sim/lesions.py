"""Synthetic lesions for the simulated brain federation: a fifth class with its own contrast.

Off by default (``SimConfig.lesion_rate = 0``): nothing here runs, and a default build is
byte-identical to one made before lesions existed (tests/sim/test_lesions.py).

With ``lesion_rate`` r > 0, each subject has one lesion with probability r, decided by
its deformation seed alone (its own random stream: the anatomy, level and scans of every
subject are unchanged), so the class imbalance is a knob: the fraction of patients with a
lesion, and the lesion size (``lesion_size_mm``: diameter range). The public bank draws
lesions at the same rate as the sites (recipes filter the bank for lesion-rich maps; a
generator conditioned on public maps sees the class).

A lesion is an ellipse (diameter drawn uniformly from the size range, axis ratio 0.6-1,
any orientation) centred on a white-matter pixel of the deformed slice, with a 1 mm soft
edge, confined to the brain. It is painted into the deformed tissue stack BEFORE pooling:
the tissue probabilities are scaled by (1 - p) and a lesion channel p is appended, so the
label map (argmax of the pooled stack) and every site's rendering describe the same
anatomy. The diameter is at least ``MIN_DIAMETER_PX`` output pixels, so every lesion that
is drawn shows in the label map at any image size.

Contrast per scanner (physics.render_contrast reads the fifth channel):
  - T1 (sites A, B and the T1 part of every site): the template T1 inside the lesion is
    replaced by ``LESION_T1_POSITION`` of the way from CSF's mean T1 to GM's (hypointense,
    like a chronic MS lesion on T1), so gamma (site B) acts on it like on any tissue;
  - T2 (C) and PD (D) tissue mixtures: their own weight, ``LESION_WEIGHTS`` (bright on T2,
    just above grey matter on PD).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.data.manifest import DatasetManifest

LESION_CLASS = "lesion"
"""The class name the build's dataset.toml declares (appended after the brain's classes)."""
LESION_STREAM = 5
"""The subject's random stream for lesions: np.random.default_rng([deformation seed, 5])."""
LESION_T1_POSITION = 0.35
"""Lesion T1 = CSF T1 + 0.35 x (GM T1 - CSF T1): darker than grey matter on T1."""
LESION_WEIGHTS = {"A": 0.0, "B": 0.0, "C": 0.85, "D": 0.74}
"""Weight of the lesion in each preset's tissue mixture (CSF, GM, WM are C (1.0, 0.55, 0.35)
and D (0.80, 0.68, 0.55)); A and B render T1 alone (mix 0), so theirs is never used."""
EDGE_MM = 1.0
MIN_DIAMETER_PX = 2.5
"""Smallest lesion diameter in output pixels: the lesion wins the argmax of at least one
pooled pixel wherever it is centred."""
WM_CENTRE = 0.5


@dataclass(frozen=True)
class LesionSpec:
    """How many subjects carry a lesion (``rate``) and how large (diameter range, mm)."""

    rate: float = 0.0
    size_mm: tuple[float, float] = (6.0, 14.0)

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.size_mm)
        object.__setattr__(self, "size_mm", (lo, hi))
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ValueError(f"lesion rate must be in [0, 1] (a fraction of patients), got {self.rate}")
        if not 0.0 < lo <= hi:
            raise ValueError(f"lesion size must be a diameter range 0 < min <= max (mm), got {self.size_mm}")

    @property
    def active(self) -> bool:
        return self.rate > 0


def has_lesion(seed: int, spec: LesionSpec) -> bool:
    """Whether the subject of deformation seed ``seed`` carries a lesion (a Bernoulli(rate)
    draw of its own stream: deterministic per subject, independent of everything else)."""
    return spec.active and bool(np.random.default_rng([seed, LESION_STREAM]).random() < spec.rate)


def lesion_t1(tissue_t1: tuple[float, float, float]) -> float:
    """The lesion's template-T1 value from the tissue means (CSF, GM, WM)."""
    return float(tissue_t1[0] + LESION_T1_POSITION * (tissue_t1[1] - tissue_t1[0]))


def lesion_weight(kind: str) -> float:
    """The lesion's weight in the tissue mixture of a site of preset ``kind``."""
    return LESION_WEIGHTS[kind]


def lesion_probability(tissue: np.ndarray, seed: int, spec: LesionSpec, pixel_mm: float,
                       min_diameter_mm: float) -> np.ndarray:
    """The lesion's soft map [R,R] in [0, 1] on the render grid (``tissue``: the deformed
    CSF, GM, WM probabilities [3,R,R]), confined to the brain."""
    rng = np.random.default_rng([seed, LESION_STREAM, 1])
    grid = tissue.shape[-1]
    rows, cols = np.nonzero(tissue[2] > WM_CENTRE)
    if rows.size == 0:  # no white matter on this slice: centre anywhere in the brain
        rows, cols = np.nonzero(tissue.sum(axis=0) > 0.5)
    pick = int(rng.integers(rows.size))
    diameter = max(float(rng.uniform(*spec.size_mm)), min_diameter_mm)
    ratio, angle = float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.0, np.pi))
    semi_major, semi_minor = diameter / 2.0, ratio * diameter / 2.0
    y, x = (np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5) * pixel_mm
    cy, cx = (rows[pick] + 0.5) * pixel_mm, (cols[pick] + 0.5) * pixel_mm
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    rho = np.sqrt((u / semi_major) ** 2 + (v / semi_minor) ** 2)
    soft = np.clip(0.5 + (1.0 - rho) * semi_minor / EDGE_MM, 0.0, 1.0)
    brain = np.clip(tissue.sum(axis=0), 0.0, 1.0)
    return (soft * brain).astype(np.float32)


def paint_lesion(maps: np.ndarray, lesion: np.ndarray,
                 tissue_t1: tuple[float, float, float]) -> np.ndarray:
    """(T1, CSF, GM, WM) [4,R,R] + a lesion map -> (T1, CSF, GM, WM, lesion) [5,R,R]: the
    tissues give way to the lesion (their sum stays the brain), T1 takes the lesion's value."""
    brain = np.clip(maps[1:4].sum(axis=0), 0.0, 1.0)
    share = np.where(brain > 1e-6, lesion / np.maximum(brain, 1e-6), 0.0)  # lesion fraction of the brain
    tissue = maps[1:4] * (1.0 - share)
    t1 = maps[0] + lesion * (lesion_t1(tissue_t1) - maps[0])
    return np.concatenate([t1[None], tissue, lesion[None]]).astype(np.float32)


def lesion_manifest() -> DatasetManifest:
    """The brain default's manifest with the lesion class appended to its label schema."""
    brain = DatasetManifest.default_brain()
    return dataclasses.replace(brain, name="brain with lesions",
                               labels=brain.labels.with_class(LESION_CLASS))


def write_lesion_schema(config, root: Path) -> None:
    """dataset.toml (MR, the brain's intensity policy, the brain's classes + lesion) at the
    root, in the public bank, every site folder and held-out site folder: the loaders, the
    run config's label-names (server/simulate.py) and the data check read the class from it."""
    manifest = lesion_manifest()
    folders = [root, root / "public"] + [root / "sites" / site for site in config.site_names]
    folders += [root / "heldout" / split / site for split in ("fit", "test") for site in config.site_names]
    for folder in folders:
        if folder.is_dir():
            manifest.write(folder)
