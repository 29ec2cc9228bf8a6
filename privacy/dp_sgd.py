"""One round of DP-SGD on the one module that sees real records (Opacus underneath).

``PrivateTraining`` resumes the site's accountant history (from the PrivacyLedger),
wraps the private module, optimizer and dataset with Opacus (Poisson sampling,
per-record clipping, Gaussian noise at the plan's FIXED noise multiplier), and exposes
``step()``, which is the only way a private step is taken:

    private = PrivateTraining(ledger.plan, ledger.history, seed=...)
    d, d_opt, loader = private.make_private(disc, torch.optim.Adam(disc.parameters()), data, 32)
    for batch in loader:                      # Poisson batches; may be empty
        loss = criterion(d(real), ...)         # mean over the batch of per-record losses
        loss.backward()
        with private.public_pass(d):           # generated/public inputs only: free
            fake_loss = ...                    # forward + loss on fakes
            grads = private.public_grads(fake_loss, d_opt)
        private.step(d_opt, grads)             # clip+noise real part, add fake part, step
    ledger.commit_round(..., spend=private.spend())

In the product the round is opened by ``PrivacyRound`` (privacy/round.py: plan, budget,
this object, commit) and the recipe drives it through ``DPModule`` (privacy/dp_step.py).

If several networks see real records, put them in ONE nn.Module (e.g. a ModuleDict)
and call make_private once: they then share one clip bound and one accountant step.

A recipe may also make ONE-OFF Gaussian releases of per-patient statistics
(``gaussian_release``: clip each patient's vector to L2 norm C, sum, add N(0, (sigma C)^2)),
each declared beforehand (``Recipe.one_off_releases`` -> ``PrivacyPlan.releases``, composed
into the calibration) and recorded in the same accountant history as the DP-SGD steps, as
the entry (sigma, 1.0, 1); ``spend()`` then counts it. The mechanism and the stored values
live in privacy/releases.py; the site's ledger is the one store of those values.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Sequence

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medgen.privacy.accounting import (History, epsilon_of, extend_history, history_steps,
                                       normalize_history, sample_rate_for)
from medgen.privacy.guards import check_private_module, make_conv_inputs_contiguous
from medgen.privacy.ledger import RoundSpend
from medgen.privacy.plan import PrivacyPlan
from medgen.privacy.releases import ReleasedValue, check_release_arguments, find_release, gaussian_sum

SAMPLE_RATE_TOLERANCE = 1e-12
GRAD_SAMPLE_MODES = ("hooks", "functorch", "no_op")

log = logging.getLogger(__name__)


class PrivateTraining:
    """One round of DP-SGD on one module that sees real records, resuming the site's history."""

    def __init__(self, plan: PrivacyPlan, history: list[tuple[float, float, int]], *,
                 secure_rng: bool = False, seed: int | None = None,
                 released: Sequence[ReleasedValue] = ()):
        if plan is None:
            raise ValueError("PrivateTraining needs the site's PrivacyPlan (PrivacyLedger.ensure_plan)")
        self.plan = plan
        self.secure_rng = secure_rng
        self.seed = seed
        self._initial_history: History = normalize_history(history)
        self._engine: PrivacyEngine | None = None
        self._optimizer: DPOptimizer | None = None
        self._hooks: list = []
        self._wrapped: GradSampleModule | None = None
        self._steps_taken = 0
        self._release_steps = 0
        self._released = list(released)  # earlier releases: the ledger's stored values
        self._new_releases: list[ReleasedValue] = []

    # -- wrapping ------------------------------------------------------------------
    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                     batch_size: int, *, grad_sample_mode: str = "hooks",
                     ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]:
        """Wrap module/optimizer/dataset for DP-SGD at the plan's noise and clip bound.

        ``grad_sample_mode``: "hooks" (default), "functorch" (per-sample grads by
        torch.func for every layer), or "no_op" (the recipe writes ``p.grad_sample``
        itself, e.g. WGAN-GP via torch.func, DP.md trap 6; Opacus still clips, noises
        and accounts). Whatever the mode, check it against per_sample_grads_reference.
        """
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if self._engine is not None:
            raise RuntimeError("make_private was already called on this PrivateTraining: put every "
                               "network that sees real records in one nn.Module and wrap it once")
        # Opacus samples (and the accountant records) at q = 1/ceil(N/B). A q at or below
        # the plan's is safe: the history records the true q, and budget projections at the
        # plan's q over-estimate. A larger q would under-estimate them: refuse.
        q = sample_rate_for(len(dataset), batch_size)
        if q > self.plan.sample_rate * (1 + SAMPLE_RATE_TOLERANCE):
            raise ValueError(
                f"privacy plan was calibrated for sample_rate {self.plan.sample_rate:.6g}, but "
                f"{len(dataset)} records at batch_size {batch_size} sample at {q:.6g} "
                "(Opacus: 1/ceil(N/B)), which would spend budget faster than planned. Use the "
                "batch size and dataset the plan was made for (plan with "
                "medgen.privacy.accounting.sample_rate_for); a new schedule needs a new ledger.")
        if q < self.plan.sample_rate * (1 - SAMPLE_RATE_TOLERANCE):
            log.info("sampling at q=%.6g, below the plan's %.6g: accounted at the true q",
                     q, self.plan.sample_rate)
        module.train()
        check_private_module(module)
        self._hooks = make_conv_inputs_contiguous(module)

        with warnings.catch_warnings():
            # Opacus warns on every engine that secure RNG is off; secure_rng is our switch.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.plan.accountant, secure_mode=self.secure_rng)
        engine.accountant.load_state_dict({"history": list(self._initial_history),
                                           "mechanism": self.plan.accountant})
        sampling_rng = noise_rng = None
        if self.seed is not None and not self.secure_rng:
            device = next(module.parameters()).device
            sampling_rng = torch.Generator().manual_seed(self.seed)
            noise_rng = torch.Generator(device=device).manual_seed(self.seed + 1)
        loader = DataLoader(dataset, batch_size=batch_size, generator=sampling_rng)
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader,
            noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=grad_sample_mode, noise_generator=noise_rng)
        self._engine, self._optimizer, self._wrapped = engine, dp_optimizer, wrapped
        return wrapped, dp_optimizer, dp_loader

    # -- stepping ------------------------------------------------------------------
    def step(self, optimizer: DPOptimizer,
             public_grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """One private step: clip + noise + scale, add public grads, optimizer step.

        ``public_grads`` (one per ``optimizer.params``, same order, None to skip) are
        gradients of losses on public or generated inputs only. They are added AFTER the
        noise, unclipped: post-processing of already-private quantities, charged nothing.
        Leaves all gradients cleared (DP.md trap 1). An empty Poisson batch (no backward,
        or a zero-length one) still takes a noise-only step and is accounted.
        """
        if optimizer is not self._optimizer:
            raise ValueError("step() needs the DPOptimizer returned by this object's make_private")
        params = optimizer.params
        if public_grads is not None and len(public_grads) != len(params):
            raise ValueError(f"public_grads has {len(public_grads)} entries, the optimizer has "
                             f"{len(params)} trainable parameters (one per param, None to skip)")
        _fill_missing_grad_samples(params)
        before = history_steps(self._engine.accountant.history)
        if not optimizer.pre_step():
            raise RuntimeError("DPOptimizer skipped the step (virtual batches are not supported here)")
        if history_steps(self._engine.accountant.history) != before + 1:
            raise RuntimeError("the privacy accountant did not record exactly one step")
        if public_grads is not None:
            for i, (p, g) in enumerate(zip(params, public_grads)):
                if g is None:
                    continue
                if g.shape != p.shape:
                    raise ValueError(f"public_grads[{i}] has shape {tuple(g.shape)}, parameter has "
                                     f"{tuple(p.shape)}")
                p.grad.add_(g.detach().to(device=p.grad.device, dtype=p.grad.dtype))
        optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._steps_taken += 1

    @contextlib.contextmanager
    def public_pass(self, module: GradSampleModule) -> Iterator[None]:
        """Run forward/backward on public or generated inputs without per-sample hooks.

        Hooks on would record those activations as if they were private records.
        """
        if not hasattr(module, "disable_hooks"):  # "no_op" mode has no hooks to pause
            yield
            return
        module.disable_hooks()
        try:
            yield
        finally:
            module.enable_hooks()

    @staticmethod
    def public_grads(loss: torch.Tensor, optimizer: DPOptimizer) -> list[torch.Tensor | None]:
        """Gradients of a public-only ``loss`` w.r.t. ``optimizer.params`` (p.grad untouched)."""
        return list(torch.autograd.grad(loss, optimizer.params, allow_unused=True))

    # -- one-off releases ----------------------------------------------------------
    def gaussian_release(self, vectors: torch.Tensor, clip_norm: float,
                         noise_multiplier: float) -> torch.Tensor:
        """Gaussian mechanism on a sum of per-patient vectors: the only other way (besides
        ``step``) that real records leave through this object.

        ``vectors`` [N, d]: ONE row per patient (the privacy unit), computed from that
        patient's record alone. Each row is clipped to L2 norm ``clip_norm`` (so adding or
        removing a patient moves the sum by at most ``clip_norm``), the rows are summed
        and N(0, (noise_multiplier * clip_norm)^2 I) is added, with the same noise source
        as DP-SGD (seeded in simulation, Opacus' secure mode if ``secure_rng``). The release
        is accounted as the accountant entry (noise_multiplier, 1.0, 1): it must have been
        declared in the plan (``PrivacyPlan.releases``, calibrated together with the
        DP-SGD schedule). If the site's history already shows it spent, the values of that
        earlier release (``released``, from the ledger) are returned instead, at no cost;
        without them the call is refused (never spent twice).
        Returns the noisy sum [d] (float64, CPU); everything computed from it is
        post-processing.
        """
        sigma = float(noise_multiplier)
        check_release_arguments(vectors, clip_norm, sigma)
        if not any(s == sigma and q == 1.0 for s, q, _ in self.plan.releases):  # (sigma, 1, n): n releases
            raise ValueError(f"the privacy plan declares no release at noise_multiplier {sigma} "
                             f"(plan releases: {list(self.plan.releases)}): an undeclared release "
                             "would spend budget the calibration did not plan for")
        if (sigma, 1.0, 1) not in self.plan.pending_releases(self.history):
            earlier = self.stored_release(sigma, vectors.shape[1])
            if earlier is not None:  # post-processing of a DP output: nothing spent
                return earlier
            raise RuntimeError(
                f"the planned release(s) {list(self.plan.releases)} are already in this site's "
                "privacy history and their values were not passed (PrivateTraining(..., "
                "released=ledger.released)): releasing again would spend budget twice")
        generator = None
        if self.seed is not None and not self.secure_rng:
            generator = torch.Generator().manual_seed(self.seed + 2)
        released = gaussian_sum(vectors, clip_norm, sigma, generator=generator,
                                secure_mode=self.secure_rng)
        if self._engine is None:
            self._initial_history = extend_history(self._initial_history, sigma, 1.0, 1)
        else:
            self._engine.accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        self._release_steps += 1
        self._new_releases.append(ReleasedValue(sigma, tuple(float(v) for v in released)))
        return released

    def stored_release(self, noise_multiplier: float, dim: int) -> torch.Tensor | None:
        """The values of a release already made at this site (this round or, through the
        ledger, an earlier one), float64; None if it was never made."""
        return find_release(self._released + self._new_releases, noise_multiplier, dim)

    # -- accounting ----------------------------------------------------------------
    @property
    def history(self) -> History:
        """Full accountant history including this round (what the ledger commits)."""
        if self._engine is None:
            return list(self._initial_history)
        return normalize_history(self._engine.accountant.history)

    @property
    def steps_taken(self) -> int:
        return self._steps_taken

    @property
    def new_releases(self) -> tuple[ReleasedValue, ...]:
        """The releases made by this object (the ledger stores them with the commit)."""
        return tuple(self._new_releases)

    @property
    def accounted_steps(self) -> int:
        """Accountant steps added by this object: private steps plus one-off releases."""
        return self._steps_taken + self._release_steps

    def spend(self) -> RoundSpend:
        """What this round added, as ONE value for ``PrivacyLedger.commit_round``."""
        return RoundSpend(self.history, self.accounted_steps, self.new_releases)

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta, self.plan.accountant)

    def close(self) -> None:
        """End of round: remove Opacus' and our hooks, leaving the plain module behind.

        Call it after the last step (e.g. before sampling, deepcopy or saving the module):
        the accounting (``history``, ``epsilon``) stays readable.
        """
        if self._wrapped is not None:
            self._wrapped.cleanup()
            self._wrapped = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _fill_missing_grad_samples(params: list[nn.Parameter]) -> None:
    """Zero per-sample grads where backward produced none, so the step is still taken.

    No backward at all (empty Poisson batch skipped by the recipe): zero-length batches.
    Some params unused by this step's loss: their per-record gradient is exactly zero.
    """
    batch = None
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is not None:
            batch = sum(len(g) for g in gs) if isinstance(gs, list) else len(gs)
            break
    for p in params:
        if getattr(p, "grad_sample", None) is None:
            p.grad_sample = p.new_zeros((batch or 0, *p.shape))
