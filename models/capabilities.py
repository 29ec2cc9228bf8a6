"""Optional recipe abilities, declared as protocols and checked with a clear refusal.

Every recipe trains and samples (models/recipe.py). Some can do more, and the tools that
need more ask for the ability, never for a recipe class:

- ``MembershipScores``: a white-box score per real record from the networks that trained
  on real data (higher = "was trained on"); the membership-inference audit
  (privacy/audit.py) attacks it. A GAN scores with its discriminator's logit, a diffusion
  model could with its denoising loss; a recipe that declares nothing is refused there.
- ``Translation``: a site's style and an image translated from one style to another, run
  by whoever holds the image (``medgen translate``, client/translate.py). What the output
  IS (modality, physical units, the window that maps the network's [-1, 1] to them) is
  data the recipe may declare with ``translated_output(target_index) ->
  TranslatedOutput``; a recipe that declares none translates within the input's modality
  and its output is written in the input's own units (``translation_output``).

A recipe declares an ability by implementing the protocol's methods; ``require`` checks it
on the recipe object and says what is missing.

What a recipe consumes is declared as two attributes of ``Recipe`` (models/recipe.py):
``consumes`` (one of ``CONSUMES``) and ``requires_labels``. ``Recipe.check_site`` refuses
a site whose data does not fit with ``SiteDataRefused``, at plan time, before a privacy
round opens (client/app.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from medgen.config import ConfigError

Capability = TypeVar("Capability")

CONSUMES = ("slices", "volumes")


class SiteDataRefused(ConfigError):
    """A site's data does not fit what the recipe consumes (no label maps for a recipe that
    needs them, volumes for a slice recipe); raised before any privacy budget is spent.
    The message names no path: it may travel back to the coordinator."""


class MembershipScores(Protocol):
    def membership_scores(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int) -> torch.Tensor:
        """One score per record [N] (or per patch, [N, ...], averaged by the caller) for real
        images [N,1,H,W] with label maps [N,H,W], as site ``site_index``; no gradients."""


class Translation(Protocol):
    def site_style(self, model: nn.Module, public: Any, site_index: int, seed: int = 0) -> Any:
        """Site ``site_index``'s style from released or public-only quantities."""

    def translate_images(self, model: nn.Module, images: torch.Tensor, source: Any,
                         target: Any) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1] from ``source``'s style to ``target``'s."""


@dataclass(frozen=True)
class TranslatedOutput:
    """What a translation's output images are, as data (no tool names a recipe).

    ``modality`` (a DICOM Modality code) and ``units`` of the output; ``window`` [lo, hi] in
    those units is the fixed map the network's [-1, 1] output stands for (lo -> -1, hi -> 1,
    linear: the window the recipe was trained on, identical at every target site of that
    modality). ``reads`` is the modality the translation takes as input. A fixed window
    because an output in another modality has no input volume to borrow a scale from."""

    modality: str
    units: str
    window: tuple[float, float]
    reads: str

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.window)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"TranslatedOutput window {self.window!r} must be finite with lo < hi")
        object.__setattr__(self, "window", (lo, hi))


class MissingCapability(ConfigError):
    """The recipe of a run does not declare an ability a tool needs."""


def declares(recipe: Any, capability: type) -> bool:
    """Whether ``recipe`` has every method of ``capability`` (checked on the object, each
    time: no isinstance cache, no recipe class named)."""
    return all(callable(getattr(recipe, name, None)) for name in _methods(capability))


def require(recipe: Any, capability: type[Capability], purpose: str) -> Capability:
    """``recipe`` if it declares ``capability``; else a ``MissingCapability`` saying which."""
    if declares(recipe, capability):
        return recipe
    name = getattr(recipe, "name", type(recipe).__name__)
    raise MissingCapability(
        f"recipe {name!r} does not declare the {capability.__name__} capability "
        f"({', '.join(_methods(capability))}), which {purpose} needs; run it on a recipe that "
        f"does, or give the recipe those methods (models/capabilities.py)")


def translation_output(recipe: Any, target_index: int) -> TranslatedOutput | None:
    """What ``recipe`` declares its translation into site ``target_index`` writes; None (no
    declaration) means: the input's modality, in the input's own units."""
    declared = getattr(recipe, "translated_output", None)
    return declared(int(target_index)) if callable(declared) else None


def _methods(capability: type) -> list[str]:
    return sorted(name for name, value in vars(capability).items()
                  if not name.startswith("_") and callable(value))
