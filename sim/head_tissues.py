"""Tissue classes of a real whole-head T1: air, soft tissue, fat, bone, CSF, GM, WM.

The head federation's anatomy is one real T1 with skull and scalp plus its brain mask
(sim/head_anatomy.py). Its labels are derived here, on the T1's own 1.5 mm grid, by
rules that were checked by eye slice by slice (docs/simulated-federation.md):

1. Axial intensity falloff. The T1 darkens by about 2.5x from the vertex down to the
   cerebellum (receive-coil profile). Each axial level is divided by the smoothed 90th
   percentile of its brain voxels (white matter dominates it), normalised to the median
   level, so one mixture model fits every level; without this the cerebellum is "CSF".
2. CSF / GM / WM: a 3-class Gaussian mixture (EM on a 256-bin histogram, deterministic
   start at the 10/50/90th percentiles) of the corrected T1 inside the brain mask;
   each voxel takes its most probable class.
3. Head: T1 above 12 % of the brain's 90th percentile (well above the air's noise and
   ghosting), the largest connected component, closed, holes filled per axial level and
   in 3D, so the dark skull and sinuses lie inside it.
4. Thick dark blobs: dark (below half the CSF mean) non-brain head voxels that survive
   an opening of 3 voxels, as 3D components. Air and the eyes' vitreous are both near
   noise level on this T1; a component is an air cavity (sinus, mastoid cells, pharynx)
   when at least 65 % of its voxels are darker than a quarter of the CSF mean, otherwise
   fluid (the globes of the eyes, large veins), which is soft tissue. Checked component
   by component: the two globes score 0.43 and 0.59, every sinus 0.67 to 0.84.
5. Bone: dark non-brain head voxels within 15 mm of the brain, except fluid blobs and
   the core of air cavities (eroded by one voxel, so a sinus keeps its bony wall), then
   closed by 2 voxels so that the bright diploe between the inner and outer tables joins
   the skull. Dark and thin near the brain is what skull looks like on T1. Air: the
   cavities' very dark core.
6. Fat: non-brain, non-bone head voxels brighter than the white-matter mean (scalp and
   orbital fat are the brightest tissue on T1). Everything else in the head is soft
   tissue (skin, muscle, galea, vessels, eyes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HEAD_CLASSES = ("air", "soft_tissue", "fat", "bone", "csf", "gm", "wm")
"""The head federation's label schema: value = index."""
AIR, SOFT_TISSUE, FAT, BONE, CSF, GM, WM = range(len(HEAD_CLASSES))
HEAD_THRESHOLD = 0.12
BONE_DARKNESS = 0.5  # bone: below this fraction of the CSF mean
AIR_DARKNESS = 0.25
BONE_REACH_MM = 15.0
THICK_OPENING = 3  # voxels: dark blobs surviving this opening are not skull
BONE_CLOSING = 2
CAVITY_DARK_FRACTION = 0.65  # of a blob's voxels below AIR_DARKNESS: air, not vitreous


@dataclass(frozen=True)
class Mixture:
    """A 1D Gaussian mixture, components sorted by mean (CSF, GM, WM on T1)."""

    means: tuple[float, ...]
    sds: tuple[float, ...]
    weights: tuple[float, ...]

    def classify(self, values: np.ndarray) -> np.ndarray:
        mu, sd, w = (np.asarray(v, np.float64) for v in (self.means, self.sds, self.weights))
        x = np.asarray(values, np.float64)[..., None]
        score = -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        return np.argmax(score, axis=-1)


@dataclass(frozen=True)
class HeadTissues:
    """labels uint8 [X, Y, Z] in HEAD_CLASSES order; t1 the falloff-corrected T1."""

    labels: np.ndarray
    t1: np.ndarray
    brain_mixture: Mixture


def fit_mixture(values: np.ndarray, components: int = 3, iterations: int = 200,
                bins: int = 256) -> Mixture:
    """EM for a 1D Gaussian mixture on a histogram of ``values`` (fast, deterministic)."""
    x = np.asarray(values, np.float64).ravel()
    lo, hi = np.percentile(x, [0.1, 99.9])
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    mu = np.percentile(x, np.linspace(10, 90, components))
    sd = np.full(components, x.std() / components)
    w = np.full(components, 1.0 / components)
    for _ in range(iterations):
        score = -0.5 * ((centres[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        resp = np.exp(score - score.max(axis=1, keepdims=True))
        resp = resp / resp.sum(axis=1, keepdims=True) * counts[:, None]
        total = np.maximum(resp.sum(axis=0), 1e-9)
        w = total / total.sum()
        mu = (resp * centres[:, None]).sum(axis=0) / total
        sd = np.maximum(np.sqrt((resp * (centres[:, None] - mu) ** 2).sum(axis=0) / total), 1e-6)
    order = np.argsort(mu)
    return Mixture(tuple(mu[order].tolist()), tuple(sd[order].tolist()), tuple(w[order].tolist()))


def axial_falloff(t1: np.ndarray, brain: np.ndarray, smooth_levels: float = 4.0) -> np.ndarray:
    """Per axial level (last axis) gain of the T1: smoothed brain 90th percentile / median."""
    levels = t1.shape[2]
    p90 = np.full(levels, np.nan)
    for z in range(levels):
        inside = t1[:, :, z][brain[:, :, z]]
        if inside.size > 100:
            p90[z] = np.percentile(inside, 90)
    known = np.flatnonzero(np.isfinite(p90))
    if known.size == 0:
        raise ValueError("the brain mask is empty: cannot estimate the T1's axial falloff")
    p90 = np.interp(np.arange(levels), known, p90[known])  # constant beyond the brain
    p90 = ndimage.gaussian_filter1d(p90, smooth_levels, mode="nearest")
    return (p90 / np.median(p90[known])).astype(np.float32)


def head_mask(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Everything inside the scalp, sinuses and skull included (rule 3)."""
    threshold = HEAD_THRESHOLD * float(np.percentile(t1[brain], 90))
    candidate = t1 > threshold
    components, count = ndimage.label(candidate)
    if count == 0:
        raise ValueError("no voxel of the T1 is above the head threshold")
    sizes = ndimage.sum(candidate, components, index=np.arange(1, count + 1))
    head = components == 1 + int(np.argmax(sizes))
    head = ndimage.binary_closing(head, structure=ndimage.generate_binary_structure(3, 1),
                                  iterations=3)
    head = np.stack([ndimage.binary_fill_holes(head[:, :, z]) for z in range(head.shape[2])], -1)
    return ndimage.binary_fill_holes(head) | brain


def split_thick_blobs(thick: np.ndarray, very_dark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(air cavities, fluid blobs) among the 3D components of ``thick`` (rule 4)."""
    components, count = ndimage.label(thick, structure=ndimage.generate_binary_structure(3, 1))
    if count == 0:
        return np.zeros_like(thick), np.zeros_like(thick)
    index = np.arange(1, count + 1)
    fraction = ndimage.mean(very_dark, components, index=index)
    is_cavity = np.concatenate([[False], np.asarray(fraction) >= CAVITY_DARK_FRACTION])
    cavities = is_cavity[components] & thick
    return cavities, thick & ~cavities


def derive_tissues(t1: np.ndarray, brain: np.ndarray, voxel_mm: float) -> HeadTissues:
    """Labels for every voxel of a whole-head T1 with a brain mask (module docstring)."""
    t1 = np.asarray(t1, np.float32)
    brain = np.asarray(brain, bool)
    corrected = t1 / axial_falloff(t1, brain)[None, None, :]
    mixture = fit_mixture(corrected[brain])
    csf_mean, _, wm_mean = mixture.means
    head = head_mask(t1, brain)
    outside_brain = head & ~brain

    cross = ndimage.generate_binary_structure(3, 1)
    dark = outside_brain & (corrected < BONE_DARKNESS * csf_mean)
    very_dark = corrected < AIR_DARKNESS * csf_mean
    cavities, fluid = split_thick_blobs(
        ndimage.binary_opening(dark, structure=cross, iterations=THICK_OPENING), very_dark)
    air = ndimage.binary_erosion(cavities & very_dark, structure=cross)
    near_brain = ndimage.distance_transform_edt(~brain) * voxel_mm <= BONE_REACH_MM
    keep_out = fluid | air
    bone = dark & near_brain & ~keep_out
    bone = ndimage.binary_closing(bone, structure=cross, iterations=BONE_CLOSING)
    bone &= outside_brain & ~keep_out

    labels = np.full(t1.shape, AIR, np.uint8)
    labels[head] = SOFT_TISSUE
    labels[outside_brain & (corrected > wm_mean)] = FAT
    labels[bone] = BONE
    labels[air] = AIR
    labels[brain] = (CSF + mixture.classify(corrected[brain])).astype(np.uint8)
    return HeadTissues(labels=labels, t1=corrected, brain_mixture=mixture)
