"""Empirical privacy audit: membership-inference attacks on the networks that saw real data.

The DP guarantee is a proof; this is the experiment a security officer can re-run. For one
site, the attacker holds candidate records, half of them the site's training patients
(members) and half patients it never saw (non-members, the same scanner's held-out
subjects), and scores each; a high score means "was trained on". Reported per attack:

- AUC of the scores (Mann-Whitney, ties count one half): 0.5 is guessing. With n1
  members and n0 non-members, an AUC from a non-leaking model scatters around 0.5 with
  standard deviation sqrt((n0 + n1 + 1) / (12 n0 n1)) (``auc_null_sd``); judge "near
  0.5" against it.
- TPR at 1 % FPR: the share of members scored above a threshold that at most 1 % of the
  non-members exceed (Carlini et al. 2022: leakage lives in the low-FPR tail). With fewer
  than 100 non-members that threshold allows no false positive at all; the exact FPR
  reached is reported (``fpr_reached``).

Attacks (all white-box on the site's own networks; in deployment they run at the site,
since the discriminator never leaves it):
- ``discriminator-logit``: the private network's score of a real (image, labels) record,
  the mean over patches for a patch discriminator (loss-based attack: the real-data loss
  is a monotone function of the logit).
- ``nearest-generated``: minus the distance to the nearest of N generated samples of that
  site from public label maps (memorisation by the released generator).
- ``conditional-reconstruction``: minus the distance between a record and the generator's
  rendering of the record's OWN label map (a conditional generator that memorised a
  patient reproduces it from its anatomy), averaged over a few noise draws.

The recipe supplies the private scores: it declares the ``MembershipScores`` capability
(models/capabilities.py: ``membership_scores(model, images, labels, site_index)``; a GAN's
discriminator logit, a diffusion model's denoising loss). ``medgen audit`` refuses a
recipe that declares none (privacy/audit_cli.py); nothing here guesses at a network's
call signature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

LOW_FPR = 0.01


@dataclass(frozen=True)
class AttackResult:
    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    fpr_reached: float
    auc_null_sd: float
    members: int
    nonmembers: int

    def to_dict(self) -> dict:
        return asdict(self)


# -- metrics (numpy oracles in the tests) -------------------------------------------------
def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted 1/2."""
    m, n = _finite(member_scores, "member"), _finite(nonmember_scores, "non-member")
    scores = np.concatenate([m, n])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray,
               max_fpr: float = LOW_FPR) -> tuple[float, float]:
    """(TPR, FPR reached) for the lowest threshold whose FPR (score > threshold) <= max_fpr."""
    m, n = _finite(member_scores, "member"), _finite(nonmember_scores, "non-member")
    allowed = int(math.floor(max_fpr * len(n) + 1e-9))  # false positives we may accept
    threshold = np.sort(n)[::-1][allowed] if allowed < len(n) else -np.inf
    return float(np.mean(m > threshold)), float(np.mean(n > threshold))


def attack_result(attack: str, member_scores, nonmember_scores) -> AttackResult:
    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    tpr, fpr = tpr_at_fpr(m, n)
    null_sd = math.sqrt((len(m) + len(n) + 1) / (12.0 * len(m) * len(n)))
    return AttackResult(attack, roc_auc(m, n), tpr, fpr, null_sd, len(m), len(n))


def _finite(scores, who: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError(f"membership audit needs at least one {who} score")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{who} scores contain non-finite values; the network under audit "
                         "is broken (check its weights)")
    return values


# -- attack scores ------------------------------------------------------------------------
@torch.no_grad()
def private_network_scores(recipe, model: torch.nn.Module, images: torch.Tensor,
                           labels: torch.Tensor, site_index: int, batch: int = 64) -> np.ndarray:
    """Score of each real record by the network(s) that trained on real data: the recipe's
    ``membership_scores`` (a per-patch score is averaged per record)."""
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch):
        x, y = images[start:start + batch].float(), labels[start:start + batch]
        scores = recipe.membership_scores(model, x, y, site_index)
        out.append(torch.as_tensor(scores).reshape(x.shape[0], -1).double().mean(1).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def generated_samples(recipe, model, label_maps: torch.Tensor, site_index: int, seed: int,
                      batch: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = [recipe.sample(model, label_maps[s:s + batch], site_index, generator=generator).cpu()
           for s in range(0, label_maps.shape[0], batch)]
    return torch.cat(out).float()


def nearest_generated_scores(candidates: torch.Tensor, generated: torch.Tensor) -> np.ndarray:
    """Minus the L2 distance (per pixel, RMS) of each candidate to its nearest generated image."""
    a = candidates.reshape(candidates.shape[0], -1).double()
    b = generated.reshape(generated.shape[0], -1).double()
    nearest = torch.cdist(a, b).min(dim=1).values / math.sqrt(a.shape[1])
    return (-nearest).numpy()


@torch.no_grad()
def reconstruction_scores(recipe, model, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int, seed: int, draws: int = 4) -> np.ndarray:
    """Minus the mean RMS distance between a record and G's renderings of its own labels."""
    total = torch.zeros(images.shape[0], dtype=torch.float64)
    for d in range(draws):
        fake = generated_samples(recipe, model, labels, site_index, seed=seed + d)
        total += (fake - images.float()).double().pow(2).flatten(1).mean(1).sqrt()
    return (-(total / draws)).numpy()


def per_patient(scores: np.ndarray, patient_index: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mean score over each patient's slices: the privacy unit is the patient."""
    index = np.asarray(patient_index).astype(np.int64)
    sums = np.bincount(index, weights=scores)
    counts = np.bincount(index)
    return sums[counts > 0] / counts[counts > 0]
