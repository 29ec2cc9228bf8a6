"""Restoration against the simulator's ground truth: a learned restorer beside the classical ones.

The held-out split renders the same subjects at every site with a noise-free twin
(data/heldout_data.py, ``clean``). A task's forward model (models/degradations.py) turns
each clean rendering into the restoration problem with a fixed seed, and every method
restores the SAME measurements:

    denoise  identity, non-local means, wavelet (BayesShrink), BM3D (if ``bm3d`` is
             installed): each told the true noise std (oracle sigma, the classical methods'
             best case; BM3D gets it as white noise even for correlated CT noise)
    sr2/sr4  bicubic (scikit-image, order 3) and Lanczos-3 (PIL), from the low-res image
    inpaint  the hole at 0 (identity) and biharmonic inpainting (scikit-image)

plus any learned restorers the caller passes (``restorers``: name -> Degraded -> images).

Scores, per image then averaged (with the count): PSNR and SSIM over the BODY region of
the clean rendering (``body_mask``: [0, 1] intensity above ``BODY_LEVEL``, holes filled;
background pixels are easy and would inflate both), on the [-1, 1] range (data range 2);
for a fixed-window site (CT) also the mean absolute error in its physical units (HU).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes
from skimage.metrics import structural_similarity
from skimage.restoration import denoise_nl_means, denoise_wavelet, inpaint_biharmonic
from skimage.transform import resize

from medgen.models.degradations import SR_FACTORS, Degradation, Degraded, NoiseModel

try:  # optional: `pip install bm3d` (not a dependency of medgen); absent -> no BM3D row
    import bm3d
except ImportError:  # pragma: no cover - depends on the environment
    bm3d = None

BODY_LEVEL = 0.1  # [0, 1] intensity: MR background is ~0 after percentile mapping; CT -700 HU
Restorer = Callable[[Degraded], torch.Tensor]


# -- the region and the scores ----------------------------------------------------------
def body_mask(clean: torch.Tensor) -> np.ndarray:
    """[N,H,W] bool: the body in each clean image [N,1,H,W] (threshold, holes filled)."""
    above = ((clean[:, 0].numpy() + 1.0) / 2.0) > BODY_LEVEL
    return np.stack([binary_fill_holes(a) for a in above])


def scores(restored: torch.Tensor, clean: torch.Tensor, body: np.ndarray,
           units_per_step: float | None = None) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over the body, per image; ``units_per_step`` (physical units
    per network unit, e.g. HU) adds the body MAE in those units. Images without body skip."""
    psnr, ssim, mae = [], [], []
    for x, y, m in zip(restored[:, 0].double().numpy(), clean[:, 0].double().numpy(), body):
        if not m.any():
            continue
        err = (x - y)[m]
        psnr.append(10.0 * np.log10(4.0 / max(float(np.mean(err ** 2)), 1e-12)))
        _, ssim_map = structural_similarity(y, x, data_range=2.0, full=True)
        ssim.append(float(ssim_map[m].mean()))
        mae.append(float(np.abs(err).mean()))
    out = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "n": len(psnr)}
    if units_per_step is not None:
        out["mae_units"] = float(np.mean(mae)) * units_per_step
    return out


# -- the classical baselines, per image in numpy (float64, [-1, 1]) -------------------
def _per_image(fn: Callable[[np.ndarray], np.ndarray], images: torch.Tensor) -> torch.Tensor:
    out = [np.clip(fn(im.double().numpy()), -1.0, 1.0) for im in images[:, 0]]
    return torch.from_numpy(np.stack(out)).float().unsqueeze(1)


def noise_std(degradation: Degradation) -> float:
    """The noise std in [-1, 1] units (Rician: its Gaussian std on [0, 1], times 2)."""
    noise = degradation.noise
    return 2.0 * noise.sigma if noise.kind == "rician" else noise.sigma


def _lanczos(low: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(low.astype(np.float32), mode="F").resize((size, size), Image.LANCZOS))


def baselines(degradation: Degradation, size: int) -> dict[str, Restorer]:
    """The classical restorers of the task (module docstring), each Degraded -> [N,1,S,S]."""
    task = degradation.task
    if task == "denoise":
        sigma = noise_std(degradation)
        out: dict[str, Restorer] = {
            "identity": lambda d: d.measurement.clone(),
            "nl_means": lambda d: _per_image(lambda im: denoise_nl_means(
                im, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True), d.measurement),
            "wavelet": lambda d: _per_image(lambda im: denoise_wavelet(
                im, sigma=sigma, method="BayesShrink", mode="soft", rescale_sigma=True), d.measurement)}
        if bm3d is not None:  # BM3D works on the [0, 1] scale here: std halves with the range
            out["bm3d"] = lambda d: _per_image(
                lambda im: 2.0 * bm3d.bm3d((im + 1.0) / 2.0, sigma / 2.0) - 1.0, d.measurement)
        return out
    if task in SR_FACTORS:
        return {"bicubic": lambda d: _per_image(lambda im: resize(im, (size, size), order=3, mode="edge",
                                                                  anti_aliasing=False), d.measurement),
                "lanczos": lambda d: _per_image(lambda im: _lanczos(im, size), d.measurement)}
    return {"identity": lambda d: d.measurement.clone(),
            "biharmonic": lambda d: torch.stack([
                torch.from_numpy(inpaint_biharmonic(im[0].double().numpy(), k[0].numpy() < 0.5)).float()[None]
                for im, k in zip(d.measurement, d.known)]).clamp(-1.0, 1.0)}


# -- one site, one seed ---------------------------------------------------------------
def evaluate_site(degradation: Degradation, clean: torch.Tensor, restorers: Mapping[str, Restorer],
                  seed: int, units_per_step: float | None = None,
                  skip: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Every restorer (classical baselines first, except those named in ``skip``, then
    ``restorers``) on the measurements of ``clean`` [N,1,S,S] degraded with ``seed``:
    {method: scores}. The body is scored whole for every task (inpainting too)."""
    degraded = degradation.apply(clean, torch.Generator().manual_seed(seed))
    body = body_mask(clean)
    classical = {k: v for k, v in baselines(degradation, clean.shape[-1]).items() if k not in skip}
    methods = {**classical, **restorers}
    return {name: scores(fn(degraded), clean, body, units_per_step) for name, fn in methods.items()}


def mean_over_seeds(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per method and metric: the mean over the seeds that ran it and its standard deviation
    (``<metric>_sd``); ``seeds`` says how many."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(m for r in runs for m in r):  # every method, first-seen order
        ran = [r[method] for r in runs if method in r]
        row: dict[str, float] = {"seeds": len(ran), "n": ran[0]["n"]}
        for metric in (k for k in ran[0] if k != "n"):
            values = [r[metric] for r in ran]
            row[metric], row[f"{metric}_sd"] = float(np.mean(values)), float(np.std(values))
        out[method] = row
    return out


def learned_restorer(recipe: Any, model: torch.nn.Module, site_index: int, seed: int,
                     steps: int | None = None) -> Restorer:
    """A trained restoration recipe as a restorer (``recipe.restore``, seeded per call)."""
    return lambda d: recipe.restore(model, d.condition, site_index,
                                    torch.Generator().manual_seed(seed), steps=steps).cpu().float()


# -- real noise: a site's own noisy scans against their clean twins (blind denoising) ----
def real_noise_std(noisy: torch.Tensor, clean: torch.Tensor) -> float:
    """The std of (noisy - clean) over the body of the clean images, in network units:
    what the oracle-sigma baselines are told, and the Gaussian-only denoiser's matched std."""
    body = torch.from_numpy(body_mask(clean))
    return float((noisy - clean)[:, 0][body].double().std())


def evaluate_real_noise(noisy: torch.Tensor, clean: torch.Tensor, restorers: Mapping[str, Restorer],
                        units_per_step: float | None = None,
                        skip: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Every denoiser on the site's REAL noisy scans [N,1,S,S] against their clean twins:
    the classical baselines told the true noise std (``real_noise_std``, as white noise: the
    scanner's noise kind is unknown to them) and ``restorers`` (name -> Degraded -> images),
    each given ``Degraded(noisy, noisy)``; {method: scores} over the body."""
    sigma = real_noise_std(noisy, clean)
    degraded = Degraded(noisy, noisy)
    oracle = Degradation("denoise", NoiseModel("correlated", sigma))
    classical = {k: v for k, v in baselines(oracle, clean.shape[-1]).items() if k not in skip}
    body = body_mask(clean)
    return {name: scores(fn(degraded), clean, body, units_per_step)
            for name, fn in {**classical, **restorers}.items()}
