"""One-off Gaussian releases of per-patient statistics: the mechanism and its stored values.

A recipe may release a sum of per-patient vectors once per site (the scanner moments of
dp-cgan and cddpm, the bridge's style statistics): clip each patient's row to L2 norm C,
sum, add N(0, (sigma C)^2 I). Adding or removing one patient moves the sum by at most C,
so this is the Gaussian mechanism at noise multiplier sigma, accounted as the Opacus
history entry (sigma, 1.0, 1) in the site's one accountant (``PrivateTraining.
gaussian_release`` does the accounting; the plan declared it, ``PrivacyPlan.releases``).

Its values are a DP output: the site's ledger stores them (``PrivacyLedger.released``,
the ONE store of a release), so every later round and run on that ledger reuses them for
free instead of spending again. ``ReleasedValue`` is one stored release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from opacus.optimizers.optimizer import _generate_noise


@dataclass(frozen=True)
class ReleasedValue:
    """One release made at a site: its noise multiplier and the noisy sum it produced."""

    noise_multiplier: float
    values: tuple[float, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ReleasedValue":
        return cls(float(data["noise_multiplier"]), tuple(float(v) for v in data["values"]))

    def to_json(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "values": list(self.values)}

    def matches(self, noise_multiplier: float, dim: int) -> bool:
        # a recipe declares each release by its sigma; the dimension tells apart two
        # releases that happen to share a sigma (moments: 15 numbers, style: 10)
        return self.noise_multiplier == float(noise_multiplier) and len(self.values) == dim


def find_release(released: Iterable[ReleasedValue], noise_multiplier: float,
                 dim: int) -> torch.Tensor | None:
    """The stored values of an earlier release at (sigma, dim), float64 on the CPU, or None."""
    for earlier in released:
        if earlier.matches(noise_multiplier, dim):
            return torch.tensor(earlier.values, dtype=torch.float64)
    return None


def check_release_arguments(vectors: torch.Tensor, clip_norm: float, noise_multiplier: float) -> None:
    sigma = float(noise_multiplier)
    if not (sigma > 0 and math.isfinite(sigma)) or not clip_norm > 0:
        raise ValueError(f"gaussian_release needs noise_multiplier > 0 and clip_norm > 0, got "
                         f"{noise_multiplier} and {clip_norm}")
    if vectors.dim() != 2 or vectors.shape[0] < 1:
        raise ValueError(f"gaussian_release needs [patients, dim] vectors, got {tuple(vectors.shape)}")


def gaussian_sum(vectors: torch.Tensor, clip_norm: float, noise_multiplier: float, *,
                 generator: torch.Generator | None, secure_mode: bool) -> torch.Tensor:
    """Clip each row of ``vectors`` [N, d] to L2 norm ``clip_norm``, sum, add Gaussian noise
    of std ``noise_multiplier * clip_norm`` (Opacus' noise source). Returns [d] float64, CPU."""
    x = vectors.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("gaussian_release got non-finite per-patient vectors")
    norms = x.norm(dim=1)
    clipped = x * (clip_norm / (norms + 1e-12)).clamp(max=1.0)[:, None]
    total = clipped.sum(dim=0)
    noise = _generate_noise(std=float(noise_multiplier) * clip_norm, reference=total,
                            generator=generator, secure_mode=secure_mode)
    return total + noise
