"""SimConfig: every knob of the simulated federation, and the seeds derived from it.

All randomness flows from ``seed``: subject k of the build (a global index over sites,
public bank and held-out sets, in that order) gets the deformation seed derived from
SeedSequence([seed, 0, k]); its scan at site s gets SeedSequence([seed, 1, k, s]). Distinct
indices make distinct seeds, so sites, the public bank and the held-out sets never share a
subject (the build checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from medgen.sim.lesions import LesionSpec
from medgen.sim.physics import SitePhysics, default_site, site_physics

GENERATOR_VERSION = "medgen.sim/3"
"""Bump when rendering changes: it is part of the config hash, so old builds are rebuilt."""


class SimConfigError(ValueError):
    """A SimConfig field is out of range; the message names it."""


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    sites: str = "A,B,C,D"  # site names (A..Z, then AA..ZZ; A-D are the presets) or a count, e.g. "6"
    subjects_per_site: int = 200
    public_size: int = 300
    heldout_fit: int = 48
    heldout_test: int = 48
    image_size: int = 64
    severity: Mapping[str, float] = field(default_factory=dict)  # per-site override of t
    quantity_skew: float = 0.0  # site k gets round(subjects_per_site * exp(-skew * k))
    # sites written as DICOM series (images/<subject>/) instead of NIfTI, e.g. ("B",)
    dicom_sites: tuple[str, ...] = ()
    # fraction of patients (sites, public bank, held-out) with a lesion, and its diameter
    # range in mm (sim/lesions.py); 0 = no lesion class (the build of before lesions)
    lesion_rate: float = 0.0
    lesion_size_mm: tuple[float, float] = (6.0, 14.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dicom_sites", _site_list(self.dicom_sites))
        object.__setattr__(self, "lesion_size_mm", tuple(float(v) for v in self.lesion_size_mm))
        try:
            self.lesion_spec()
        except ValueError as err:
            raise SimConfigError(f"SimConfig fields 'lesion_rate'/'lesion_size_mm': {err}") from None
        _require(32 <= self.image_size <= 128, "image_size", "must be between 32 and 128")
        _require(self.subjects_per_site >= 1, "subjects_per_site", "must be >= 1")
        for name in ("public_size", "heldout_fit", "heldout_test"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.quantity_skew >= 0, "quantity_skew", "must be >= 0")
        names = self.site_names
        for site, t in self.severity.items():
            _require(site in names, "severity", f"names site '{site}', not one of {names}")
            _require(0.0 <= float(t) <= 1.0, "severity", f"of site '{site}' must be in [0, 1]")
        for site in self.dicom_sites:
            _require(site in names, "dicom_sites", f"names site '{site}', not one of {names}")

    @property
    def site_names(self) -> tuple[str, ...]:
        text = str(self.sites).strip()
        if text.isdigit():
            count = int(text)
            _require(1 <= count <= MAX_SITES, "sites", f"count must be between 1 and {MAX_SITES}")
            return tuple(site_name(index) for index in range(count))
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        _require(len(names) >= 1 and len(set(names)) == len(names), "sites",
                 "must be a count or comma-separated distinct site names, e.g. 'A,B,C,D'")
        for name in names:
            _require(site_index(name) is not None, "sites",
                     f"site '{name}' must be a letter A..Z or two letters AA..ZZ (A-D are the "
                     "scanner presets, later names interpolate them; see "
                     "docs/simulated-federation.md)")
        return names

    def physics(self) -> dict[str, SitePhysics]:
        out = {}
        for name in self.site_names:
            kind, t = default_site(site_index(name), name)
            out[name] = site_physics(kind, float(self.severity.get(name, t)), name=name)
        return out

    def lesion_spec(self) -> LesionSpec | None:
        """The lesion knobs, or None when the build has no lesion class."""
        spec = LesionSpec(float(self.lesion_rate), tuple(self.lesion_size_mm))
        return spec if spec.active else None

    def site_counts(self) -> dict[str, int]:
        return {name: max(1, int(round(self.subjects_per_site * np.exp(-self.quantity_skew * k))))
                for k, name in enumerate(self.site_names)}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["severity"] = {k: float(v) for k, v in sorted(self.severity.items())}
        data["dicom_sites"] = list(self.dicom_sites)
        if not self.dicom_sites:  # an all-NIfTI build keeps the config hash it always had
            del data["dicom_sites"]
        data["lesion_size_mm"] = list(self.lesion_size_mm)
        if not self.lesion_rate:  # a build without lesions keeps the config hash it always had
            del data["lesion_rate"], data["lesion_size_mm"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SimConfigError(f"unknown SimConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def config_hash(self) -> str:
        text = json.dumps({"version": GENERATOR_VERSION, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


MAX_SITES = 26 + 26 * 26
"""Site names run like spreadsheet columns: A..Z, then AA, AB, ..., ZZ."""


def site_name(index: int) -> str:
    """The name of the site at ``index`` (0 -> A, 25 -> Z, 26 -> AA, 27 -> AB, ...)."""
    if not 0 <= index < MAX_SITES:
        raise SimConfigError(f"SimConfig field 'sites' has at most {MAX_SITES} sites, asked for index {index}")
    letters = string.ascii_uppercase
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def site_index(name: str) -> int | None:
    """Inverse of ``site_name``; None for anything that is not one or two letters A..Z.
    A site's physics follow its name's index, whatever other sites are built with it."""
    letters = string.ascii_uppercase
    if len(name) == 1 and name in letters:
        return letters.index(name)
    if len(name) == 2 and name[0] in letters and name[1] in letters:
        return 26 * (letters.index(name[0]) + 1) + letters.index(name[1])
    return None


def deformation_seed(config_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([config_seed, 0, index]).generate_state(1, np.uint64)[0] >> 1)


def scan_seed(config_seed: int, index: int, site_index: int) -> int:
    return int(np.random.SeedSequence([config_seed, 1, index, site_index])
               .generate_state(1, np.uint64)[0] >> 1)


def _site_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """"B,C" or ["B", "C"] -> ("B", "C") in site-letter order, without duplicates."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(sorted({str(item).strip() for item in items if str(item).strip()}))


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise SimConfigError(f"SimConfig field '{name}' {why}")
