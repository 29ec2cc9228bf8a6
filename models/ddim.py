"""The diffusion noise schedule and deterministic DDIM sampling (cddpm's helpers).

``alphas_cumprod`` is MONAI's schedule; the DDIM update is written out (eta = 0) rather
than MONAI's ``DDIMScheduler.step``, which steps to t - T // n and so disagrees with its
own rounded linspace timesteps when n does not divide T.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler


def alphas_cumprod(train_timesteps: int, schedule: str, prediction: str) -> torch.Tensor:
    """alpha-bar_t of MONAI's schedule (float64 CPU; cast where used)."""
    scheduler = DDPMScheduler(num_train_timesteps=train_timesteps, schedule=schedule,
                              prediction_type=prediction)
    return scheduler.alphas_cumprod.to(torch.float64)


def training_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v-prediction


def ddim_timesteps(train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced, strictly decreasing timesteps from T-1 down to 0."""
    return sorted({round(v) for v in torch.linspace(train_timesteps - 1, 0, steps).tolist()}, reverse=True)


def ddim_step(model_out: torch.Tensor, x_t: torch.Tensor, abar_t: float, abar_prev: float,
              prediction: str) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) from timestep t to the NEXT timestep in the list."""
    a_t, a_prev = torch.tensor(abar_t, dtype=x_t.dtype), torch.tensor(abar_prev, dtype=x_t.dtype)
    if prediction == "epsilon":
        x0 = (x_t - (1 - a_t).sqrt() * model_out) / a_t.sqrt()
    elif prediction == "sample":
        x0 = model_out
    else:
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_out
    x0 = x0.clamp(-1.0, 1.0)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
