"""Multi-scale sliced Wasserstein distance on Laplacian-pyramid patches (SWD).

After Karras et al. 2018 (ProGAN, appendix D): build a Laplacian pyramid of every image,
take small patches at each level, and measure how far the *distribution* of patches of
one set is from the other's with the sliced Wasserstein distance (the mean over random
unit directions of the 1-D Wasserstein-1 distance of the projected patches). The finest
level holds noise and edge sharpness, the middle levels texture, the coarsest (low-pass)
level contrast and layout: a blurred copy loses fine-level energy, a noisy one gains it,
a flattened one loses the middle levels, an intensity remap moves the low-pass level.

Written here because no installed library has it (POT is not a dependency; skimage's
``pyramid_laplacian`` is per image, Gaussian rather than the binomial filter ProGAN
uses, and scikit-image is only a test extra). Choices, and where they differ from ProGAN:

- 5-tap binomial filter [1, 4, 6, 4, 1] / 16 with reflect padding (OpenCV's pyrDown /
  pyrUp, as ProGAN); levels down to 16 px; 7 x 7 patches; ``PATCHES_PER_IMAGE`` random
  patches per image and level at seeded positions.
- Descriptors of BOTH sets are normalised with the *reference* set's mean and standard
  deviation per level. ProGAN normalised each set by its own statistics, which cancels a
  global change of contrast or sharpness, exactly what a blurred generator produces.
- The W1 of each direction is exact and weighted: both sets' projections are merged and
  sorted once, and a bootstrap replicate (rows weighted by how often they were drawn)
  is a cumulative sum over that order, with no sort per replicate (``SortedProjections``).
  tests/evaluation/test_set_metrics.py checks it against scipy's weighted W1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medgen.evaluation.bootstrap import Statistic, multiplicity_weights

PATCH = 7
PATCHES_PER_IMAGE = 48
DIRECTIONS = 64
MIN_LEVEL_SIZE = 16
DIRECTION_SEED = 0   # part of the metric's definition: every comparison uses these directions
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial filter, reflect padding: [N,1,H,W] -> same shape."""
    kernel = _BINOMIAL.to(x.dtype)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5))
    return F.conv2d(x, kernel.view(1, 1, 5, 1))


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def pyramid_up(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-insertion upsampling then the same filter times 4 (keeps the mean), cropped."""
    n, c, h, w = x.shape
    up = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
    up[..., ::2, ::2] = 4 * x
    return _blur(up)[..., :shape[0], :shape[1]]


def laplacian_pyramid(images: torch.Tensor, min_size: int = MIN_LEVEL_SIZE) -> list[torch.Tensor]:
    """Band-pass levels, finest first, then the low-pass level (side <= min_size * 2 - 1).

    Exact: adding every level back up (``pyramid_up`` from the coarsest) gives the image.
    """
    current = images.to(torch.float64)
    levels = []
    while min(current.shape[-2:]) >= 2 * min_size:
        smaller = pyramid_down(current)
        levels.append(current - pyramid_up(smaller, tuple(current.shape[-2:])))
        current = smaller
    levels.append(current)
    return levels


@dataclass(frozen=True)
class PyramidPatches:
    """Per level: the side in pixels and the patches [N, PATCHES_PER_IMAGE, PATCH * PATCH]."""

    sizes: tuple[int, ...]
    patches: tuple[np.ndarray, ...]


def describe_patches(images: torch.Tensor, seed: int = 0) -> PyramidPatches:
    """Seeded random patches of every pyramid level of images [N,1,H,W]."""
    rng = np.random.default_rng(seed)
    sizes, patches = [], []
    offsets = np.arange(PATCH)
    for level in laplacian_pyramid(images):
        array = level[:, 0].numpy()
        n, h, w = array.shape
        if min(h, w) < PATCH:
            raise ValueError(f"pyramid level of {h}x{w} px is smaller than a {PATCH}x{PATCH} patch")
        top = rng.integers(0, h - PATCH + 1, (n, PATCHES_PER_IMAGE))
        left = rng.integers(0, w - PATCH + 1, (n, PATCHES_PER_IMAGE))
        rows = top[:, :, None, None] + offsets[:, None]
        cols = left[:, :, None, None] + offsets[None, :]
        picked = array[np.arange(n)[:, None, None, None], rows, cols]
        sizes.append(h)
        patches.append(picked.reshape(n, PATCHES_PER_IMAGE, PATCH * PATCH))
    return PyramidPatches(tuple(sizes), tuple(patches))


def random_directions(dim: int, count: int = DIRECTIONS, seed: int = DIRECTION_SEED) -> np.ndarray:
    """[dim, count] unit vectors, the same for every comparison."""
    directions = np.random.default_rng(seed).standard_normal((dim, count))
    return directions / np.linalg.norm(directions, axis=0, keepdims=True)


class SortedProjections:
    """Two sets' projected samples merged and sorted once per direction.

    Row r of set a (of ``n_a``) owns ``per_row`` samples; with row weights w_a (summing
    to 1) and w_b, W1 along a direction is the integral of |F_a - F_b|: between
    consecutive merged values the CDF difference is the cumulative signed weight so far.
    """

    def __init__(self, proj_a: np.ndarray, proj_b: np.ndarray):
        (n_a, per_row, k), n_b = proj_a.shape, proj_b.shape[0]
        if proj_b.shape[1:] != (per_row, k):
            raise ValueError(f"projection shapes differ: {proj_a.shape} vs {proj_b.shape}")
        values = np.concatenate([proj_a.reshape(-1, k), proj_b.reshape(-1, k)])
        owner = np.concatenate([np.repeat(np.arange(n_a), per_row),
                                n_a + np.repeat(np.arange(n_b), per_row)]).astype(np.int32)
        order = np.argsort(values, axis=0, kind="stable")
        ordered = np.take_along_axis(values, order, axis=0)
        # float32: 1e-7 relative error on a sum of ~1e4 terms, twice the speed of float64
        self.gaps = np.diff(ordered, axis=0).astype(np.float32)
        self.owner = owner[order][:-1]
        self.n_a, self.n_b, self.per_row = n_a, n_b, per_row

    def w1(self, weight_a: np.ndarray, weight_b: np.ndarray) -> float:
        """Mean over directions of the weighted 1-D W1 (row weights each summing to 1)."""
        signed = (np.concatenate([weight_a, -weight_b]) / self.per_row).astype(np.float32)[self.owner]
        per_direction = (np.abs(np.cumsum(signed, axis=0)) * self.gaps).sum(axis=0)
        return float(per_direction.mean())


def swd_statistic(a: PyramidPatches, b: PyramidPatches) -> Statistic:
    """{"swd": mean over levels, "swd_<side>px": per level}, in units of b's patch s.d."""
    if a.sizes != b.sizes:
        raise ValueError(f"pyramid levels differ: {a.sizes} vs {b.sizes} (different image sizes)")
    levels = []
    for size, patches_a, patches_b in zip(a.sizes, a.patches, b.patches):
        centre, scale = patches_b.mean(), patches_b.std() or 1.0
        directions = random_directions(patches_b.shape[-1])
        levels.append((size, SortedProjections(((patches_a - centre) / scale) @ directions,
                                               ((patches_b - centre) / scale) @ directions)))

    def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
        out = {}
        for size, merged in levels:
            out[f"swd_{size}px"] = merged.w1(multiplicity_weights(index_a, merged.n_a),
                                             multiplicity_weights(index_b, merged.n_b))
        out["swd"] = float(np.mean(list(out.values())))
        return out

    return statistic
