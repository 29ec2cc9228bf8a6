"""A learned-feature distance whose extractor cannot have learned texture invariance.

``RandomConvFeatures`` ("randconv-v1") is a small convolutional network that is never
trained: its weights are drawn once from a fixed seed (He-normal, numpy's PCG64, so the
same on every machine and torch version) and hashed. Its features are, for each of four
layers, every channel's spatial mean and standard deviation after a ReLU: the mean says
how much of a local pattern an image holds, the standard deviation how unevenly (the
Gram-style texture statistics of Gatys et al. 2015, reduced to their diagonal).

Why random, and why not medgen's own trained encoder (FD_medgenenc-v1): an extractor
trained to classify sites and segment anatomy is *rewarded* for ignoring within-site
texture and noise, and ours did (EVALUATION.md, December). A random convolution has no
objective, so it keeps whatever its filters respond to: edges, noise, blur, contrast all
move the features. Random embeddings are the recommended choice for fidelity/diversity
metrics off the ImageNet domain (Naeem et al. 2020, "Reliable Fidelity and Diversity
Metrics for Generative Models", section 5), and need no weights from anywhere. A
self-supervised network trained on public renderings would be a defensible alternative,
but it would have to be trained, versioned and re-validated; randomness needs only a seed.

The distance on these features is KID (unbiased MMD^2, cubic kernel; feature_metrics.py)
after standardising every feature with the reference set's mean and standard deviation,
so that no layer dominates by scale. Precision, recall, density and coverage use the
same standardised features (density_coverage.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgen.evaluation.bootstrap import Statistic
from medgen.evaluation.density_coverage import fidelity_diversity_statistic
from medgen.evaluation.feature_metrics import kid_resampled, polynomial_kernel
from medgen.evaluation.hashing import state_dict_sha256

VERSION = "randconv-v1"
WIDTHS = (16, 32, 64, 64)
WEIGHT_SEED = 20240101   # the version's weights: change it and the version name together


class RandomConvFeatures(nn.Module):
    """Untrained conv stack; features = per-layer channel mean and s.d. (2 * sum(WIDTHS))."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, seed: int = WEIGHT_SEED):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.convs = nn.ModuleList()
        in_ch = 1
        for width in widths:
            conv = nn.Conv2d(in_ch, width, 3, padding=1, padding_mode="reflect")
            fan_in = in_ch * 9
            weight = rng.standard_normal((width, in_ch, 3, 3)) * np.sqrt(2.0 / fan_in)
            conv.weight.data = torch.from_numpy(weight).float()
            conv.bias.data = torch.from_numpy(rng.uniform(-0.1, 0.1, width)).float()
            conv.requires_grad_(False)
            self.convs.append(conv)
            in_ch = width
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats, hidden = [], images.float()
        for i, conv in enumerate(self.convs):
            hidden = F.relu(conv(hidden))
            feats += [hidden.mean(dim=(2, 3)), hidden.std(dim=(2, 3))]
            if i < len(self.convs) - 1:
                hidden = F.avg_pool2d(hidden, 2)
        return torch.cat(feats, dim=1)

    def features(self, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """[N, D] float64 features of images [N,1,H,W] in [-1, 1]."""
        return torch.cat([self(images[i:i + batch_size].cpu())
                          for i in range(0, len(images), batch_size)]).double().numpy()

    def sha256(self) -> str:
        return state_dict_sha256(self)


def standardise(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets z-scored with the reference set b's per-feature mean and s.d."""
    centre, scale = b.mean(axis=0), b.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return (a - centre) / scale, (b - centre) / scale


def random_feature_statistic(a: np.ndarray, b: np.ndarray) -> Statistic:
    """{"kid_rand", "precision", "recall", "density", "coverage"} on features [Na, D], [Nb, D]."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    za, zb = standardise(a, b)
    k_aa, k_bb, k_ab = polynomial_kernel(za, za), polynomial_kernel(zb, zb), polynomial_kernel(za, zb)
    fidelity = fidelity_diversity_statistic(za, zb)

    def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
        return {"kid_rand": kid_resampled(k_aa, k_bb, k_ab, index_a, index_b),
                **fidelity(index_a, index_b)}

    return statistic
