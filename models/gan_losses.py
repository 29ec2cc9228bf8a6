"""The GAN losses every medgen GAN recipe shares, elementwise over patch logits.

A batch loss is their plain .mean(): every record has the same number of patches, so with
Opacus' "mean" reduction each record's gradient is that of its own mean patch loss (checked
against an autograd loop in the recipes' tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("nonsat", "hinge")


def disc_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - logits) if real else F.relu(1.0 + logits)
    return F.softplus(-logits) if real else F.softplus(logits)  # -log sigmoid / -log(1-sigmoid)


def gen_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return -logits if kind == "hinge" else F.softplus(-logits)
