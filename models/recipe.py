"""The one abstraction: a recipe is a generative method, trained locally at a site.

A recipe owns its networks as ONE ``nn.Module`` (so one ArrayRecord travels), says
which of its sub-modules see real images (those are DP-trained through
``PrivateTraining``, everything else must be post-processing), which state-dict keys are
shared with the federation (the rest stays on the node), the local training step,
sampling, and nothing else. Client, server, privacy and evaluation code never branch on
the recipe name: they call these methods.

Contract for ``train_local(model, ctx)`` (``ctx``: a ``RoundContext``):
- real records come only from ``ctx.data`` (this site's patients), and only through
  ``ctx.private``: DP-SGD on the private module via ``privacy.dp_step.DPModule`` (Poisson
  sampling, per-patient clipping, noise, accounting);
- every other network update consumes only ``ctx.public`` inputs or generated samples;
- it takes exactly ``ctx.steps`` private optimizer steps (the node's ``PrivacyRound``
  checked the budget for them) and returns scalar metrics (losses), never tensors;
- the only other use of real records allowed is a release declared by
  ``one_off_releases`` and made through ``release_once`` (accounted in the same history;
  the plan's noise was calibrated for it; the ledger stores its values).

Optional abilities (membership scores for the audit, translation) are declared by
implementing the protocols of models/capabilities.py; callers check them there. What a
recipe consumes is declared too: ``consumes`` ("slices" or "volumes") and
``requires_labels``; the node checks a site against them at plan time (``check_site``),
before any privacy budget is spent. The label schema (class names, hence the number of
label-input channels and the length of any per-class release) comes from the run config
(``label-names``), never from a constant.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from medgen.config import RunConfig
from medgen.models.capabilities import CONSUMES, SiteDataRefused
from medgen.models.options import RecipeOptions
from medgen.models.round_context import PublicData, RoundContext

__all__ = ["PublicData", "Recipe", "RecipeOptions", "RoundContext"]  # the recipe contract, in one import


class Recipe(ABC):
    """Base class; subclasses set ``name``, ``Options`` and implement the methods."""

    name: ClassVar[str]
    Options: ClassVar[type[RecipeOptions]] = RecipeOptions
    #: dotted names of the sub-modules that see real images (trained with DP-SGD)
    private_modules: ClassVar[tuple[str, ...]] = ()
    #: state-dict key prefixes that leave the site; None means every key
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None
    #: shared keys whose first dimension is indexed by site id (a site embedding, a per-site
    #: contrast table): only site k trains row k, so the server takes row k from site k's
    #: replies alone instead of averaging it with K-1 untouched copies (server/strategy.py)
    site_indexed_keys: ClassVar[tuple[str, ...]] = ()
    #: what one training record is: a 2D slice stack per patient, or a 3D volume
    consumes: ClassVar[str] = "slices"
    #: whether training reads a label map with every image (a site without one is refused)
    requires_labels: ClassVar[bool] = True

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        """The recipe's one-off Gaussian releases of per-patient statistics, as accountant
        entries ``(noise_multiplier, sample_rate, steps)`` (a Gaussian mechanism on a sum of
        clipped per-patient vectors is ``(sigma, 1.0, 1)``). The plan's DP-SGD noise is
        calibrated for their composition with the schedule (``PrivacyRound``), and
        ``train_local`` makes them through ``release_once`` only (``gaussian_release``).
        None by default: the plan is then exactly Opacus' DP-SGD calibration."""
        return ()

    def __init__(self, config: RunConfig):
        self.config = config
        self.options = self.Options.from_mapping(self.name, config.options)
        self.num_sites = len(config.site_names)
        self.label_names = config.class_names  # the schema: label value i = label_names[i]
        self.num_classes = len(self.label_names)
        if self.consumes not in CONSUMES:
            raise TypeError(f"recipe {self.name!r} declares consumes={self.consumes!r}; "
                            f"expected one of {CONSUMES}")

    def check_site(self, data: Any) -> None:
        """Refuse, at plan time and before any budget is spent, a site whose data this
        recipe cannot train on: label maps required but the site has none, or records of
        the wrong kind (slices vs volumes). ``SiteDataRefused`` names what is missing."""
        if self.requires_labels and getattr(data, "has_labels", True) is False:
            raise SiteDataRefused(
                f"recipe {self.name!r} needs a label map with every image, and this site has "
                f"no labels (no labels/ folder, or its dataset.toml declares none); train a "
                f"recipe that needs no labels on it (e.g. site-gan), or add label maps")
        schema = getattr(data, "schema", None)
        if self.requires_labels and schema is not None and len(schema.names) != self.num_classes:
            raise SiteDataRefused(
                f"recipe {self.name!r} was configured for {self.num_classes} classes (label-names "
                f"{','.join(self.label_names)}), but this site's dataset.toml declares "
                f"{len(schema.names)} ({','.join(schema.names)}); set label-names to the "
                f"federation's schema")
        dims = getattr(data, "dims", None)  # what the loaded site data serves, if it says
        served = getattr(data, "consumes", None) or {2: "slices", 3: "volumes"}.get(dims)
        if served is not None and served != self.consumes:
            raise SiteDataRefused(f"recipe {self.name!r} consumes {self.consumes}, but this "
                                  f"site's data serves {served}")

    def real_images(self, batch: Any, device: torch.device) -> torch.Tensor:
        """Images [B,1,S,S] of a dataset batch for a recipe that reads no label map (the label
        slot, if any, is never read); a batch of another shape is an error naming the fix."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1:] != (1, size, size):
            raise ValueError(f"site batch has images {tuple(images.shape[1:])}; expected "
                             f"(1, {size}, {size}) for image-size {size}: reload the site data")
        return images.to(device, torch.float32)

    @abstractmethod
    def build(self) -> nn.Module:
        """All networks of the recipe in one module, deterministically initialised."""

    def initialise(self, model: nn.Module) -> None:
        """Prepare the initial global model on the coordinator, once, before round 1 (never
        on resume): e.g. load weights trained on public data only. Nothing by default."""

    @abstractmethod
    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        """Train in place for ``ctx.steps`` private steps; return scalar metrics."""

    @abstractmethod
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,1,H,W] in [-1, 1] for integer label maps [N,H,W] and site ids [N]."""

    # -- checks every recipe's train_local/sample make the same way ---------------------
    def check_round(self, ctx: RoundContext) -> None:
        if not 0 <= ctx.site_index < self.num_sites:
            raise ValueError(f"site_index {ctx.site_index} out of range for sites {self.config.site_names}")
        if ctx.steps < 1:
            raise ValueError(f"steps must be >= 1, got {ctx.steps}")

    def real_batch(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B,1,S,S] float32, labels [B,S,S]) from a PatientDataset batch, on ``device``."""
        size = self.config.image_size
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(f"{self.name} needs dataset items (image [1,H,W], label map [H,W]); "
                             f"got a batch of type {type(batch).__name__}")
        images, labels = batch[0], batch[1]
        if images.shape[1:] != (1, size, size) or labels.shape[1:] != (size, size):
            raise ValueError(f"site batch has images {tuple(images.shape[1:])} and labels "
                             f"{tuple(labels.shape[1:])}; expected (1, {size}, {size}) and "
                             f"({size}, {size}) for image-size {size}: reload the site data")
        return images.to(device, torch.float32), labels.to(device)

    def release_once(self, row: torch.Tensor, ctx: RoundContext,
                     statistics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     clip_norm: float, noise_multiplier: float, no_labels_hint: str = "") -> bool:
        """A one-off release of this site's per-patient ``statistics`` into ``row`` (this
        site's row of a site-indexed buffer), spent only the first time. Returns True if
        ``row`` was empty before (the model meets the release for the first time).

        Made before (this site's ledger stores its values: ``ctx.private.stored_release``)?
        Then those values, at no cost. Otherwise ``statistics(images, labels)`` on ONE slice
        per patient (``ctx.data[i]`` is patient i, the unit) -> ``ctx.private.
        gaussian_release`` (clip to ``clip_norm``, sum, noise, accounted; the ledger keeps the
        values with the round's commit).
        """
        values = ctx.private.stored_release(noise_multiplier, row.numel())
        if values is None:
            data = ctx.data
            if getattr(data, "has_labels", True) is False:
                raise ValueError(f"{self.name}'s one-off release needs the site's label maps "
                                 f"(labels/ folder); this site has none{no_labels_hint}")
            items = [data[i] for i in range(len(data))]
            images, labels = self.real_batch((torch.stack([it[0] for it in items]),
                                              torch.stack([it[1] for it in items])), torch.device("cpu"))
            values = ctx.private.gaussian_release(statistics(images, labels), clip_norm, noise_multiplier)
        fresh = not bool(row.abs().sum() > 0)
        with torch.no_grad():
            row.copy_(values.to(row.dtype))
        return fresh

    @staticmethod
    @contextlib.contextmanager
    def inference(model: nn.Module) -> Iterator[torch.device]:
        """Eval mode and no gradients for sampling or scoring; yields the model's device."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield next(model.parameters()).device
        finally:
            model.train(was_training)

    @staticmethod
    def site_ids(site_index: torch.Tensor | int, count: int) -> torch.Tensor:
        """One site id per image: an int broadcasts, a tensor must have ``count`` entries."""
        site = torch.as_tensor(site_index, dtype=torch.long)
        site = site.expand(count) if site.dim() == 0 else site
        if site.shape != (count,):
            raise ValueError(f"site_index has shape {tuple(site.shape)}, expected [{count}]")
        return site

    # -- what travels ---------------------------------------------------------------
    def shared_keys(self, model: nn.Module) -> list[str]:
        keys = list(model.state_dict().keys())
        if self.shared_prefixes is None:
            return keys
        return [k for k in keys if k.startswith(self.shared_prefixes)]

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {k: state[k] for k in self.shared_keys(model)}

    def local_only_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        shared = set(self.shared_keys(model))
        return {k: v for k, v in model.state_dict().items() if k not in shared}
