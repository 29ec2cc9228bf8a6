"""Per-tissue intensity and texture distributions, and their Wasserstein-1 distances.

A radiologist reads tissue contrast and tissue texture: is white matter as bright as it
should be relative to grey matter, is the background noise right, is grey matter grainy
or waxy. For every label class, the pixels of that class across a set form distributions
of two *bands*:

    intensity   the pixel value itself (contrast, shading, intensity transfer)
    fine        the finest Laplacian-pyramid band (laplacian_swd.py): noise, edge
                sharpness, fine texture; a blurred or flattened tissue loses it

The distance between two sets is the Wasserstein-1 distance per band, class and region,
between histograms on one set of bins: the integral of |CDF_a - CDF_b|, computed for every
cell at once (``histogram_w1``); scipy's ``wasserstein_distance`` on the bin centres is its
oracle in the tests, and is 30 times slower called per cell inside a bootstrap. The labels of a generated image are the map it was
conditioned on, so a generator that renders other anatomy than it was asked for (mode
collapse, duplicated outputs) puts the wrong tissue under a label and is seen here.

Regions. Pixels are pooled per class *and per region of the image* (``REGIONS`` x
``REGIONS`` = 3 x 3 tiles). Pooled over the whole image, a shading (one side brighter, the
other darker) looks like a slightly wider spread; per region it is a shift. Measured on
brain site B (whose own scans carry random bias fields of up to +-25 %), a systematic
+-20 % field left the floor's interval at 3 x 3 and 128 images per half, but not at
2 x 2 (bench/metric_sanity.py).

Reported quantities:

    tissue_w1          intensity W1, mean over (class, region), in physical units: with a
                       fixed window (CT) a normalised difference d is d (hi - lo) / 2 HU
                       (``TissueUnits.from_window``); MR has no physical unit and is
                       normalised per volume, so MR stays in normalised units ("norm.")
    tissue_w1_<class>  the same for one class (mean over regions)
    tissue_texture     fine-band W1 / the reference's fine-band s.d., mean over cells
    tissue_bands       mean of the two bands' W1, each divided by the reference's s.d. of
                       that band: one dimensionless number that sees contrast, shading,
                       noise and texture (intensity alone misses added noise at noisy
                       sites: a tissue's intensity spread is mostly anatomy, not noise)

Per image, each (band, class, region) is binned into ``BINS`` fixed bins (intensity over
[-1, 1]: 12 HU of a 3000 HU window; fine band over [-0.5, 0.5], clipped), so a bootstrap
replicate's pooled histogram is a weighted sum of per-image histograms; W1 is computed
on the bin centres (binning moves it by at most half a bin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medgen.evaluation.bootstrap import Statistic
from medgen.evaluation.laplacian_swd import laplacian_pyramid
from medgen.evaluation.quantities import NORMALISED

BINS = 512
REGIONS = 3                        # regions per side (3 x 3 tiles)
BAND_RANGES = ((-1.0, 1.0), (-0.5, 0.5))   # intensity, finest Laplacian band
BAND_NAMES = ("intensity", "fine")
COARSE_BINS = 64      # report histograms in normalised units (the brain report's resolution)


def _centres(low: float, high: float) -> np.ndarray:
    edges = np.linspace(low, high, BINS + 1)
    return (edges[:-1] + edges[1:]) / 2


CENTRES = tuple(_centres(*r) for r in BAND_RANGES)


@dataclass(frozen=True)
class TissueUnits:
    """How a normalised intensity difference becomes a reported one."""

    name: str = NORMALISED    # "HU" for a CT window; "norm." for per-volume normalised MR
    per_normalised: float = 1.0
    offset: float = 0.0       # physical value of normalised 0 (for histogram axes)

    @classmethod
    def from_window(cls, low: float, high: float, name: str = "HU") -> "TissueUnits":
        return cls(name=name, per_normalised=(high - low) / 2, offset=(high + low) / 2)

    @property
    def physical(self) -> bool:
        """True for a fixed physical scale (a CT window): distances and axes in its unit."""
        return self.name != NORMALISED

    def to_physical(self, normalised: np.ndarray) -> np.ndarray:
        return np.asarray(normalised) * self.per_normalised + self.offset


@dataclass(frozen=True)
class TissueHistograms:
    """counts[n, band, class, region, bin] for each image n."""

    counts: np.ndarray
    class_names: tuple[str, ...]


def _bin(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(((values - low) / (high - low) * BINS).astype(np.int64), 0, BINS - 1)


def tissue_histograms(images: torch.Tensor, labels: torch.Tensor,
                      class_names: tuple[str, ...]) -> TissueHistograms:
    """Histograms per image, band, class and region (images [N,1,H,W], labels [N,H,W])."""
    if labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    clamped = images.detach().to("cpu", torch.float64).clamp(-1, 1)
    classes = labels.detach().cpu().numpy().astype(np.int64)
    if classes.min() < 0 or classes.max() >= len(class_names):
        raise ValueError(f"labels hold classes outside 0..{len(class_names) - 1} ({class_names})")
    bands = (clamped[:, 0].numpy(), laplacian_pyramid(clamped)[0][:, 0].numpy())
    n, h, w = bands[0].shape
    rows = np.minimum(np.arange(h) * REGIONS // h, REGIONS - 1)
    cols = np.minimum(np.arange(w) * REGIONS // w, REGIONS - 1)
    cell = ((np.arange(n)[:, None, None] * len(class_names) + classes) * REGIONS ** 2
            + (rows[:, None] * REGIONS + cols[None, :])[None])
    cells = n * len(class_names) * REGIONS ** 2
    per_band = [np.bincount((cell * BINS + _bin(band, *limits)).ravel(), minlength=cells * BINS)
                .reshape(n, len(class_names), REGIONS ** 2, BINS)
                for band, limits in zip(bands, BAND_RANGES)]
    # float32 holds pixel counts exactly up to 2**24 (4096 images of 64 x 64) at half the memory
    return TissueHistograms(np.stack(per_band, axis=1).astype(np.float32), tuple(class_names))


def _band_sd(pooled: np.ndarray, centres: np.ndarray) -> float:
    """Standard deviation of every pixel of a band, from its pooled histograms."""
    weights = pooled.reshape(-1, BINS).sum(axis=0)
    mean = float(weights @ centres / weights.sum())
    return float(np.sqrt(weights @ (centres - mean) ** 2 / weights.sum())) or 1.0


def histogram_w1(a: np.ndarray, b: np.ndarray, bin_width: float) -> np.ndarray:
    """W1 between histograms [..., BINS] on the same uniform bins; NaN where either is empty."""
    total_a, total_b = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf_gap = np.cumsum(a / total_a - b / total_b, axis=-1)
    w1 = np.abs(cdf_gap[..., :-1]).sum(axis=-1) * bin_width
    return np.where((total_a[..., 0] > 0) & (total_b[..., 0] > 0), w1, np.nan)


def tissue_statistic(a: TissueHistograms, b: TissueHistograms, units: TissueUnits) -> Statistic:
    """The module docstring's quantities; a cell empty in either (resampled) set is left out."""
    if a.class_names != b.class_names:
        raise ValueError(f"class names differ: {a.class_names} vs {b.class_names}")
    shape = a.counts.shape[1:]
    flat_a, flat_b = a.counts.reshape(len(a.counts), -1), b.counts.reshape(len(b.counts), -1)
    reference_sd = [_band_sd(b.counts[:, k], CENTRES[k]) for k in range(len(BAND_RANGES))]

    widths = [(high - low) / BINS for low, high in BAND_RANGES]

    def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
        pooled_a = (np.bincount(index_a, minlength=len(flat_a)) @ flat_a).reshape(shape)
        pooled_b = (np.bincount(index_b, minlength=len(flat_b)) @ flat_b).reshape(shape)
        w1 = np.stack([histogram_w1(pooled_a[k], pooled_b[k], widths[k]) for k in range(len(widths))])
        out: dict[str, float] = {}
        for c, name in enumerate(a.class_names):
            cells = w1[0, c][np.isfinite(w1[0, c])]
            out[f"tissue_w1_{name}"] = units.per_normalised * float(cells.mean()) if len(cells) else float("nan")
        band_means = [float(np.nanmean(w1[k])) if np.isfinite(w1[k]).any() else float("nan")
                      for k in range(len(widths))]
        out["tissue_w1"] = units.per_normalised * band_means[0]
        out["tissue_texture"] = band_means[1] / reference_sd[1]
        out["tissue_bands"] = float(np.mean([m / sd for m, sd in zip(band_means, reference_sd)]))
        return out

    return statistic


def pooled_histograms(histograms: TissueHistograms, units: TissueUnits,
                      bins: int | None = None) -> dict[str, object]:
    """Per class, the set's intensity density on ``bins`` bins, in physical units (what the
    report draws: generated vs real, one chart per class, and per-tissue means).

    Default bins: all ``BINS`` on a physical scale (a 3000 HU window in 64 bins would put
    CSF, grey and white matter, 0 to 45 HU, into one or two 47 HU bins; 512 bins are 5.9
    HU wide); ``COARSE_BINS`` in normalised units."""
    bins = bins or (BINS if units.physical else COARSE_BINS)
    group = BINS // bins
    intensity = histograms.counts[:, 0].sum(axis=(0, 2))          # [class, BINS]
    pooled = intensity.reshape(len(histograms.class_names), bins, group).sum(-1)
    centres = units.to_physical(CENTRES[0].reshape(bins, group).mean(-1))
    totals = np.maximum(pooled.sum(axis=1, keepdims=True), 1)
    return {"units": units.name, "centres": [round(float(c), 6) for c in centres],
            "density": {name: [round(float(v), 6) for v in row]
                        for name, row in zip(histograms.class_names, pooled / totals)}}
