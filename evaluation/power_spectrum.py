"""Radially averaged power spectrum (RAPS) distance between two image sets.

Each image's 2-D power spectrum |FFT|^2 / (H W) is averaged over rings of equal spatial
frequency (integer radius in FFT bins, 1 .. min(H, W) / 2; the DC term is left out, an
intensity offset is the tissue metric's business), and the set's spectrum is the mean
over images of the log10 power per ring. The distance is the root-mean-square difference
of the two sets' log spectra over the rings, in decibels (10 log10): 3 dB means one set
has twice the power of the other on average. Blur removes high-frequency power, noise
adds a flat floor, texture loss removes mid frequencies, a contrast change shifts every
ring: the spectrum sees what FD features can be trained to ignore.

numpy's FFT does the work; the ring average and the distance are a few lines, so they
are written here (no installed library has a radial power spectrum).
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.evaluation.bootstrap import Statistic, multiplicity_weights

LOG_FLOOR = 1e-12   # keeps log10 finite for an all-constant image (power exactly 0)


def radial_bins(height: int, width: int) -> tuple[np.ndarray, int]:
    """Ring index of every FFT bin (0 = DC) and the number of rings kept (1..min(H,W)//2)."""
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return np.rint(radius).astype(np.int64), min(height, width) // 2


def radial_log_spectra(images: torch.Tensor) -> np.ndarray:
    """log10 ring-averaged power of each image [N,1,H,W] -> [N, rings], ring r = r cycles/FOV."""
    array = images[:, 0].detach().to("cpu", torch.float64).numpy()
    n, h, w = array.shape
    power = np.abs(np.fft.fft2(array)) ** 2 / (h * w)
    ring, rings = radial_bins(h, w)
    keep = (ring >= 1) & (ring <= rings)
    index = ring[keep] - 1
    counts = np.bincount(index, minlength=rings)
    sums = np.stack([np.bincount(index, weights=p[keep], minlength=rings) for p in power])
    return np.log10(np.maximum(sums / counts, LOG_FLOOR))


def spectrum_statistic(a: np.ndarray, b: np.ndarray) -> Statistic:
    """{"psd": RMS dB difference of the mean log spectra} for spectra [Na, R] and [Nb, R]."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"spectra have {a.shape[1]} and {b.shape[1]} rings (different image sizes)")

    def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
        mean_a = multiplicity_weights(index_a, len(a)) @ a
        mean_b = multiplicity_weights(index_b, len(b)) @ b
        return {"psd": float(10 * np.sqrt(np.mean((mean_a - mean_b) ** 2)))}

    return statistic


def mean_spectrum_db(spectra: np.ndarray) -> list[float]:
    """The set's spectrum in dB per ring (for report charts)."""
    return [float(v) for v in 10 * spectra.mean(axis=0)]
