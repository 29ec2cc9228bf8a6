"""HeadSimConfig: every knob of the head-CT federation, and its dataset manifests.

Sites are letters: A-D are the CT scanner presets of sim/ct_physics.py, M is the MR
site (sim/physics.py preset A, 3T T1w) rendering the same anatomy model. Seeds follow
the brain federation (sim/config.py): subject k of the build (sites in order, then the
public bank, heldout/fit, heldout/test) is deformed with SeedSequence([seed, 0, k]),
scanned at site s with SeedSequence([seed, 1, k, s]), and has its tissue HU drawn from
its deformation seed, so every site sees a subject with the same physiology.

``paired_sites`` (off by default; a default config's dict and hash do not mention it) makes
named CT sites hold a misaligned MR of every patient beside its CT (sim/paired_modalities.py,
the DA-GAN setting): the site's dataset.toml declares ``[paired] modality = "MR"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import (DEFAULT_CT_WINDOW, DatasetManifest, GeometryPolicy,
                                  IntensityPolicy, PairedModality)
from medgen.sim.config import SimConfigError
from medgen.sim.ct_physics import CT_PRESETS, CTSitePhysics
from medgen.sim.head_tissues import HEAD_CLASSES
from medgen.sim.physics import PRESETS as MR_PRESETS
from medgen.sim.physics import SitePhysics

HEAD_GENERATOR_VERSION = "medgen.sim.head/1"
"""Bump when rendering changes: it is part of the config hash, so old builds are rebuilt."""
FEDERATION = "head-ct"
MR_SITE = "M"
SITE_LETTERS = tuple(CT_PRESETS) + (MR_SITE,)
PAIRED_FOLDER = "paired"
"""Folder of a paired site's second modality (MR), beside images/ and labels/."""
PAIRED_KEYS = ("paired_sites", "misregistration_mm")
"""Fields left out of a config's dict (and hash) while no site is paired: default builds
stay byte-identical to builds made before the option existed."""


@dataclass(frozen=True)
class HeadSimConfig:
    seed: int = 0
    sites: str = "A,B,C,D,M"  # CT scanners A-D, the MR site M
    subjects_per_site: int = 200
    public_size: int = 300
    heldout_fit: int = 48
    heldout_test: int = 48
    image_size: int = 64  # 2D: image side; 3D: volume side (field of view 240 mm)
    dims: int = 2  # 2: one axial slice per subject; 3: one whole-head volume per subject
    window: tuple[float, float] = DEFAULT_CT_WINDOW  # the CT window of every CT site (HU)
    paired_sites: str = ""  # CT sites that also hold a misaligned MR of each patient
    misregistration_mm: float = 6.0  # size of the MR's smooth random misregistration

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        _require(self.dims in (2, 3), "dims", "must be 2 (slices) or 3 (volumes)")
        low, high = (32, 128) if self.dims == 2 else (16, 96)
        _require(low <= self.image_size <= high, "image_size",
                 f"must be between {low} and {high} for dims={self.dims}")
        _require(self.subjects_per_site >= 1, "subjects_per_site", "must be >= 1")
        for name in ("public_size", "heldout_fit", "heldout_test"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(len(self.window) == 2 and self.window[0] < self.window[1], "window",
                 "must be [lo, hi] HU with lo < hi, e.g. (-1000, 2000)")
        self.site_names  # validates the site letters
        for name in self.paired_site_names:
            _require(name in self.site_names and name != MR_SITE, "paired_sites",
                     f"site '{name}' must be one of this build's CT sites "
                     f"({', '.join(n for n in self.site_names if n != MR_SITE)})")
        _require(not self.paired_site_names or self.dims == 2, "paired_sites",
                 "needs dims=2 (paired misaligned volumes are not rendered yet)")
        _require(0.0 <= self.misregistration_mm <= 30.0, "misregistration_mm",
                 "must be between 0 and 30 mm")

    @property
    def site_names(self) -> tuple[str, ...]:
        names = tuple(name.strip() for name in str(self.sites).split(",") if name.strip())
        _require(len(names) >= 1 and len(set(names)) == len(names), "sites",
                 "must be comma-separated distinct site letters, e.g. 'A,B,C,D,M'")
        for name in names:
            _require(name in SITE_LETTERS, "sites", f"site '{name}' is not one of "
                     f"{', '.join(SITE_LETTERS)} (A-D: CT scanners, M: the MR site)")
        return names

    @property
    def paired_site_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in str(self.paired_sites).split(",") if n.strip())

    def physics(self) -> dict[str, CTSitePhysics | SitePhysics]:
        return {name: dataclasses.replace(MR_PRESETS["A"], name=MR_SITE) if name == MR_SITE
                else CT_PRESETS[name] for name in self.site_names}

    def paired_physics(self) -> SitePhysics:
        """The scanner of a paired site's MR: the M site's (3T T1w)."""
        return dataclasses.replace(MR_PRESETS["A"], name=MR_SITE)

    def manifest(self, site: str | None = None) -> DatasetManifest:
        """dataset.toml of the root (site None or a CT site) or of the MR site."""
        labels = LabelSchema.from_names(HEAD_CLASSES)
        geometry = GeometryPolicy()
        if site == MR_SITE:
            return DatasetManifest(modality="MR", intensity=IntensityPolicy(), labels=labels,
                                   dims=self.dims, geometry=geometry, name=f"{FEDERATION} MR site")
        intensity = IntensityPolicy(units="HU", normalisation="window", window=self.window)
        paired = PairedModality("MR", PAIRED_FOLDER) if site in self.paired_site_names else None
        return DatasetManifest(modality="CT", intensity=intensity, labels=labels,
                               dims=self.dims, geometry=geometry, name=FEDERATION, paired=paired)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["window"] = list(self.window)
        if not self.paired_site_names:
            for key in PAIRED_KEYS:
                data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HeadSimConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SimConfigError(f"unknown HeadSimConfig field(s) {sorted(unknown)}; "
                                 f"known: {sorted(known)}")
        values = dict(data)
        if "window" in values:
            values["window"] = tuple(values["window"])
        return cls(**values)

    def config_hash(self) -> str:
        text = json.dumps({"version": HEAD_GENERATOR_VERSION, "config": self.to_dict()},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise SimConfigError(f"HeadSimConfig field '{name}' {why}")
