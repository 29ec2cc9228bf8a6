"""Tiny synthetic held-out data (docs/data-layout.md layout) and stand-in recipes.

Two "scanners" render the same random ellipse anatomies with opposite tissue contrast
(T1-like vs T2-like), so site style is learnable and generators can be right or wrong.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SIZE = 32
# intensity of background, CSF, GM, WM per site
CONTRASTS = {"A": (0.0, 0.25, 0.55, 0.9), "B": (0.0, 0.9, 0.55, 0.3)}


def random_anatomy(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Nested ellipses: CSF rim, GM ring, WM core, plus a CSF 'ventricle'."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    ry, rx = size * rng.uniform(0.36, 0.44), size * rng.uniform(0.30, 0.40)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    labels = np.zeros((size, size), np.int16)
    labels[r < 1.0] = 1
    labels[r < rng.uniform(0.8, 0.9)] = 2
    labels[r < rng.uniform(0.45, 0.65)] = 3
    vy, vx = cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)
    labels[np.sqrt((yy - vy) ** 2 + ((xx - vx) / 0.6) ** 2) < size * rng.uniform(0.06, 0.12)] = 1
    return labels


def render(labels: np.ndarray, site: str, rng: np.random.Generator | None, noise: float = 0.03) -> np.ndarray:
    image = np.asarray(CONTRASTS[site], dtype=np.float64)[labels]
    if rng is not None:
        image = image + rng.normal(0, noise, image.shape)
    return image


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def write_heldout(root: Path, n_fit: int, n_test: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("fit", n_fit), ("test", n_test)):
        for i in range(n):
            labels = random_anatomy(rng)
            for site in CONTRASTS:
                clean = render(labels, site, None)
                noisy = np.clip(render(labels, site, rng), 0, 1)
                base = root / "heldout" / split / site
                _save(base / "images" / f"s{i:03d}.nii.gz", np.round(noisy * 4095).astype(np.int16))
                _save(base / "clean" / f"s{i:03d}.nii.gz", clean.astype(np.float32))
                _save(base / "labels" / f"s{i:03d}.nii.gz", labels)
    return root


class RenderingRecipe:
    """A 'perfect' generator: renders the requested site's contrast from the label map."""

    name = "rendering"

    def __init__(self, wrong_site: bool = False):
        self.wrong_site = wrong_site

    def sample(self, model, label_maps, site_index, generator=None):
        sites = list(CONTRASTS)
        out = []
        for labels, k in zip(label_maps, site_index.tolist()):
            site = sites[1 - k] if self.wrong_site else sites[k]
            table = torch.tensor(CONTRASTS[site], dtype=torch.float32)
            image = (table[labels] + 0.03 * torch.randn(labels.shape, generator=generator)).clamp(0, 1)
            # the loader's per-image robust range (0.5..99.5 percentile -> [-1, 1])
            low, high = torch.quantile(image, torch.tensor([0.005, 0.995]))
            out.append((2 * (image - low) / (high - low) - 1).clamp(-1, 1))
        return torch.stack(out)[:, None]


class NoiseRecipe:
    name = "noise"

    def sample(self, model, label_maps, site_index, generator=None):
        return torch.rand((len(label_maps), 1, *label_maps.shape[-2:]), generator=generator) * 2 - 1
