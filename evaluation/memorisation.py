"""Memorisation: do generated images copy the patients a site trained on?

Every fidelity metric here compares generated images with *held-out* real images, so a
generator that copies its training patients scores as well as a perfect one (a copy is a
real image). Copying is therefore measured separately, by nearest neighbours in pixel
space (a copy is close in pixels; features could hide it):

    d_train(g)   distance from generated image g to its nearest TRAINING image
    d_heldout(g) distance from g to its nearest held-out image (patients never trained on)
    ratio        d_train / d_heldout per image; about 1 or above for a generator that
                 generalises (training patients are no closer than new ones), near 0
                 for copies. Reported as the median and the 5th percentile.
    copy_rate    fraction of generated images closer to a training image than 95 % of
                 real held-out patients are (the threshold is the 5th percentile of
                 d_train over held-out real images: how close a *new* patient of this
                 site gets to a training patient by chance). A generalising generator
                 sits near 0.05; a copying one near 1.

Only a party that holds both the training images and the generator can compute this:
in simulation the coordinator can (the sites are folders on one machine); in a real
federation it is a site-local check, and the privacy audit (membership inference,
privacy/) is the cross-site measure.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist

COPY_QUANTILE = 0.05


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float64).reshape(len(images), -1).numpy()


def nearest_distance(query: torch.Tensor, pool: torch.Tensor) -> np.ndarray:
    """Euclidean distance (per pixel RMS) from each query image to its nearest pool image."""
    q, p = _flat(query), _flat(pool)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"image sizes differ: {q.shape[1]} vs {p.shape[1]} pixels")
    return cdist(q, p).min(axis=1) / np.sqrt(q.shape[1])


def memorisation(generated: torch.Tensor, training: torch.Tensor, heldout: torch.Tensor,
                 heldout_probe: torch.Tensor) -> dict[str, float]:
    """Nearest-neighbour copy statistics (module docstring).

    ``heldout`` is the pool of new patients the ratio's denominator uses; ``heldout_probe``
    are *other* held-out real images that calibrate the copy threshold (real new patients'
    distance to the training set), disjoint from ``heldout`` so no image is its own neighbour.
    """
    d_train = nearest_distance(generated, training)
    d_heldout = nearest_distance(generated, heldout)
    ratio = d_train / np.maximum(d_heldout, 1e-12)
    threshold = float(np.quantile(nearest_distance(heldout_probe, training), COPY_QUANTILE))
    return {"median_ratio": float(np.median(ratio)), "ratio_p05": float(np.quantile(ratio, 0.05)),
            "copy_rate": float((d_train < threshold).mean()), "copy_threshold": threshold,
            "median_d_train": float(np.median(d_train)), "n_generated": float(len(generated)),
            "n_training": float(len(training)), "n_heldout": float(len(heldout))}
