"""Intensity maps: physical units <-> network range [-1, 1], with the exact inverse kept.

Two maps, chosen by the manifest's [intensity] policy, never by the recipe:

- ``WindowMap`` (CT): one fixed window [lo, hi] in HU, the same at every site and for
  every volume. forward = 2 (x - lo) / (hi - lo) - 1, clipped to [-1, 1]; inverse is the
  affine map back. Inside the window the round trip is exact up to float rounding, so
  integer HU come back exactly after rounding; values outside the window come back as
  the window's edge (that is what the window means: choose it to cover the tissue).
- ``PercentileMap`` (MR and other arbitrary units): per *volume* (one patient), the
  low..high percentiles of all its voxels map to -1..1, clipped. Per volume, not per
  slice: slices of one patient share one scale, so a volume keeps its through-plane
  contrast. The fitted (lo, hi) travel with the sample (``to_dict``) so that generated
  or translated images can be written back in the source's units.

Both are plain data (``to_dict`` / ``intensity_map_from_dict``) for caches and reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from medgen.data.manifest import IntensityPolicy


class IntensityMap(Protocol):
    units: str

    def forward(self, physical: np.ndarray) -> np.ndarray: ...

    def inverse(self, normalised: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class WindowMap:
    """A fixed window [lo, hi] (e.g. HU) <-> [-1, 1]."""

    lo: float
    hi: float
    units: str = "HU"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"window [{self.lo}, {self.hi}] must be finite with lo < hi")

    def forward(self, physical: np.ndarray) -> np.ndarray:
        x = np.asarray(physical, np.float64)
        return np.clip(2.0 * (x - self.lo) / (self.hi - self.lo) - 1.0, -1.0, 1.0).astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        y = np.clip(np.asarray(normalised, np.float64), -1.0, 1.0)
        return (y + 1.0) * 0.5 * (self.hi - self.lo) + self.lo

    @property
    def step(self) -> float:
        """Physical size of one float32 step near the window's top: the round-trip error."""
        return float(np.spacing(np.float32(1.0))) * (self.hi - self.lo) / 2.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "window", "lo": self.lo, "hi": self.hi, "units": self.units}


@dataclass(frozen=True)
class PercentileMap:
    """One volume's robust range [lo, hi] (its percentiles) <-> [-1, 1]."""

    lo: float
    hi: float
    percentiles: tuple[float, float]
    units: str = "arbitrary"

    @classmethod
    def fit(cls, volume: np.ndarray, percentiles: tuple[float, float],
            units: str = "arbitrary") -> "PercentileMap":
        """The robust range of all voxels of one patient's volume (2D or 3D)."""
        values = np.asarray(volume, np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError("cannot fit a percentile map: the volume is empty or holds NaN/inf")
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        if hi <= lo:  # almost constant volume: fall back to its full range
            lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise ValueError(f"the volume is constant ({lo:g}); nothing to normalise")
        return cls(lo=lo, hi=hi, percentiles=(float(percentiles[0]), float(percentiles[1])),
                   units=units)

    def forward(self, physical: np.ndarray) -> np.ndarray:
        x = np.asarray(physical, np.float64)
        return np.clip(2.0 * (x - self.lo) / (self.hi - self.lo) - 1.0, -1.0, 1.0).astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        y = np.clip(np.asarray(normalised, np.float64), -1.0, 1.0)
        return (y + 1.0) * 0.5 * (self.hi - self.lo) + self.lo

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "percentile", "lo": self.lo, "hi": self.hi,
                "percentiles": list(self.percentiles), "units": self.units}


def intensity_map(policy: IntensityPolicy, volume: np.ndarray | None = None) -> IntensityMap:
    """The map for one patient's volume under ``policy`` (a window ignores the volume)."""
    if policy.normalisation == "window":
        if policy.window is None:
            raise ValueError("a window normalisation needs [intensity] window = [lo, hi]")
        return WindowMap(lo=policy.window[0], hi=policy.window[1], units=policy.units)
    if volume is None:
        raise ValueError("a percentile normalisation is fitted per volume: pass the volume")
    return PercentileMap.fit(volume, policy.percentiles, units=policy.units)


def intensity_map_from_dict(data: Mapping[str, Any]) -> IntensityMap:
    """Rebuild a map saved with ``to_dict`` (cache entries, sample provenance)."""
    kind = data.get("kind")
    if kind == "window":
        return WindowMap(lo=float(data["lo"]), hi=float(data["hi"]), units=str(data["units"]))
    if kind == "percentile":
        low, high = data["percentiles"]
        return PercentileMap(lo=float(data["lo"]), hi=float(data["hi"]),
                             percentiles=(float(low), float(high)), units=str(data["units"]))
    raise ValueError(f"unknown intensity map kind {kind!r}; expected 'window' or 'percentile'")
