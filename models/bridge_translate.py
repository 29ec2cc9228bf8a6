"""bridge-translate: cross-site translation through the tissue label map, DP only on D.

Translation of an image x from site s to site t, done locally by whoever holds x:

    p = S(x)                                 soft tissue probabilities (contrast-agnostic S)
    m_s = per-tissue means of x under p      (x's own statistics: never leave the caller)
    r = x - sum_k p_k m_s[k]                 x's within-tissue texture and partial volume,
                                             smoothed 0.7 px (noise) and detrended at 4 px (bias)
    y = sum_k p_k M_t[k] + g * r             target contrast, source texture carried over
    y = blur(y, sqrt(b_t^2 - b_s^2))         target resolution

where M_t, b_t (tissue means and blur of site t) and b_s are the SiteStyle of each site,
measured on samples of the foundation generator G(public label map, site), and g is the
least-squares slope of the target tissue means on the source tissue means (the first-
order map of a within-tissue intensity deviation: negative for T1 -> T2, so texture and
partial volume flip with the contrast). ``BridgeTranslator.gan_translate`` is the plain
bridge x -> argmax S(x) -> G(., t) of the issue, kept for comparison.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD", "Conditioning"). Unit: the patient.
  1. ``cgan.disc`` (D) is the ONLY network that reads private records: the foundation
     recipe (medgen.models.dp_cgan, reused by composition) trains it through
     ``PrivateTraining`` only: Poisson sampling of patients, per-patient clipping, noise
     at the plan's fixed multiplier, the accountant the plan names. It is the site's
     whole epsilon; nothing else here spends any.
  2. ``cgan.gen`` (G) is updated from public label maps, site ids, noise and D's
     released parameters only (dp_cgan's module docstring, point 3): post-processing.
  3. ``seg`` (S) is updated by ``pretrain_segmenter`` (first round; public renderings only)
     and ``public_segmenter_update``, whose inputs are
     (a) random-contrast renderings of PUBLIC label maps (medgen.sim.random_contrast) and
     (b) G's samples with the public label maps that conditioned them. It receives no
     site data at all (its signature has no dataset), so it is post-processing of DP
     outputs and public data. tests/models/test_bridge_translate.py checks that S's
     update is identical for two models whose D (the only data-dependent part) differs.
  4. SiteStyle statistics are computed from G's samples on public maps (free), never
     from a site's images. The per-image statistics m_s, r of the image being translated
     are computed by its holder, at translation time, and never leave it.
  5. Returned metrics are those of dp_cgan (public-input losses only) plus S's loss on
     public/generated batches.
``style_from_images`` also measures a style on REAL labelled images: evaluation uses it
for the central, non-private ceiling only; it is never called by ``train_local``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medgen.config import ConfigError
from medgen.models.dp_cgan import CGANOptions, DPConditionalGAN, _cpu_copy, _restore
from medgen.models.recipe import PublicData, Recipe, RecipeOptions
from medgen.models.segmenter import (NUM_CLASSES, SegmenterSettings, build_segmenter, fit_segmenter,
                                     predict_probs, public_batches)
from medgen.sim.random_contrast import RandomContrast, gaussian_blur, render_random_contrast

BLUR_GRID = tuple(0.25 * i for i in range(13))  # candidate blur sigmas (px) for SiteStyle
MIN_TISSUE_MASS = 4.0  # pixels of probability mass below which a per-image mean is unreliable


@dataclass(frozen=True)
class BridgeOptions(CGANOptions):
    seg_pretrain_steps: int = 600  # first round: S on public renderings (same at every site)
    seg_steps_per_round: int = 10
    seg_batch_size: int = 32
    seg_lr: float = 1e-3
    seg_generated_fraction: float = 0.25
    seg_generated_from_round: int = 2  # G's samples join S's batches from this round on
    style_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seg_steps_per_round < 0 or self.seg_batch_size < 2 or self.style_samples < 4:
            raise ConfigError("options.seg-steps-per-round must be >= 0, seg-batch-size >= 2, "
                              "style-samples >= 4")
        if not 0.0 <= self.seg_generated_fraction < 1.0:
            raise ConfigError("options.seg-generated-fraction must be in [0, 1)")


class BridgeModel(nn.Module):
    """``cgan`` = the foundation (gen shared, disc private), ``seg`` = S (public-trained, shared)."""

    def __init__(self, cgan: nn.Module, seg: nn.Module):
        super().__init__()
        self.cgan = cgan
        self.seg = seg


@dataclass(frozen=True)
class SiteStyle:
    """A site's look on the [-1, 1] scale: mean intensity of background, CSF, GM, WM and
    the Gaussian blur (px) that best maps a flat tissue rendering onto its images."""

    tissue_means: tuple[float, float, float, float]
    blur_px: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def style_from_images(images: torch.Tensor, labels: torch.Tensor) -> SiteStyle:
    """Measure a SiteStyle on images [N,1,H,W] with their label maps [N,H,W]."""
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair")
    x = images[:, 0].float()
    means = []
    for k in range(NUM_CLASSES):
        inside = labels == k
        means.append(float(x[inside].mean()) if inside.any() else float("nan"))
    if any(math.isnan(m) for m in means):
        raise ValueError("every tissue class must occur in the label maps to measure a style")
    flat = torch.tensor(means)[labels.long()][:, None]
    errors = [float(((gaussian_blur(flat, torch.full((x.shape[0],), s)) - images.float()) ** 2).mean())
              for s in BLUR_GRID]
    return SiteStyle(tuple(means), BLUR_GRID[min(range(len(errors)), key=errors.__getitem__)])


def translate(seg: nn.Module, images: torch.Tensor, source: SiteStyle, target: SiteStyle,
              carry_texture: bool = True, texture_smooth_px: float = 0.7,
              texture_detrend_px: float = 4.0) -> torch.Tensor:
    """Translate images [N,1,H,W] in [-1,1] from ``source``'s style to ``target``'s (see the
    module docstring). The input tensor is not modified.

    ``texture_smooth_px`` > 0 low-passes the carried residual (the source's scanner noise is
    not anatomy); ``texture_detrend_px`` > 0 removes its slowly varying part (the source's
    bias field)."""
    p = predict_probs(seg, images)  # [N,K,H,W]
    x = images.float()
    mass = p.sum(dim=(2, 3))  # [N,K]
    own = (p * x).sum(dim=(2, 3)) / mass.clamp(min=1e-6)
    fallback = torch.tensor(source.tissue_means).expand_as(own)
    m_src = torch.where(mass >= MIN_TISSUE_MASS, own, fallback)
    m_tgt = torch.tensor(target.tissue_means, dtype=x.dtype)
    y = (p * m_tgt[None, :, None, None]).sum(dim=1, keepdim=True)
    if carry_texture:
        residual = x - (p * m_src[:, :, None, None]).sum(dim=1, keepdim=True)
        n = residual.shape[0]
        if texture_detrend_px > 0:
            residual = residual - gaussian_blur(residual, torch.full((n,), texture_detrend_px))
        if texture_smooth_px > 0:
            residual = gaussian_blur(residual, torch.full((n,), texture_smooth_px))
        s, t = m_src[:, 1:], m_tgt[1:].expand_as(m_src[:, 1:])
        sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
        gain = (sc * tc).sum(1) / (sc ** 2).sum(1).clamp(min=1e-6)
        y = y + gain.clamp(-3.0, 3.0)[:, None, None, None] * residual
    extra = math.sqrt(max(0.0, target.blur_px ** 2 - source.blur_px ** 2))
    if extra > 0.05:
        y = gaussian_blur(y, torch.full((y.shape[0],), extra))
    return y.clamp(-1.0, 1.0)


class BridgeTranslator(Recipe):
    """Foundation G(label map, site) with DP D + public-trained S; see the module docstring."""

    name: ClassVar[str] = "bridge-translate"
    Options: ClassVar[type[RecipeOptions]] = BridgeOptions
    private_modules: ClassVar[tuple[str, ...]] = ("cgan.disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("cgan.gen.", "seg.")

    def __init__(self, config):
        super().__init__(config)
        cgan_keys = {f.name.replace("_", "-") for f in dataclasses.fields(CGANOptions)}
        self.foundation = DPConditionalGAN(dataclasses.replace(
            config, options={k: v for k, v in config.options.items() if k in cgan_keys}))
        if self.options.share_discriminator:
            self.shared_prefixes = ("cgan.gen.", "seg.", "cgan.disc.")
        self.seg_settings = SegmenterSettings(steps=max(1, self.options.seg_steps_per_round),
                                              batch_size=self.options.seg_batch_size,
                                              lr=self.options.seg_lr)

    def build(self) -> nn.Module:
        return BridgeModel(self.foundation.build(), build_segmenter(self.seg_settings, self.config.seed + 1))

    # -- training ---------------------------------------------------------------------
    def train_local(self, model, data, public, private, site_index, steps, local_state, device):
        rounds_done = int(local_state.get("rounds_trained", 0))
        if rounds_done == 0 and self.options.seg_pretrain_steps > 0:
            self.pretrain_segmenter(model, public, torch.device(device))
        # the private part: D under DP-SGD, G as post-processing (dp_cgan, by composition)
        metrics = self.foundation.train_local(model.cgan, data, public, private, site_index,
                                              steps, local_state, device)
        if self.options.seg_steps_per_round > 0:
            seed = (self.config.seed * 7_919 + site_index * 104_729 + rounds_done) % 2**63
            metrics.update(self.public_segmenter_update(model, public, rounds_done, local_state,
                                                        seed, torch.device(device)))
        return metrics

    def pretrain_segmenter(self, model: BridgeModel, public: PublicData, device: torch.device) -> None:
        """S on random-contrast renderings of public maps only; the seed does not depend on
        the site, so every site computes the same S from the same broadcast weights."""
        settings = SegmenterSettings(steps=self.options.seg_pretrain_steps, batch_size=16, lr=3e-3)
        model.seg.to(device)
        fit_segmenter(model.seg, public_batches(public.label_maps.long(), settings.batch_size),
                      settings, seed=self.config.seed + 1)

    def public_segmenter_update(self, model: BridgeModel, public: PublicData, round_index: int,
                                local_state: dict[str, Any], seed: int,
                                device: torch.device) -> dict[str, float]:
        """S steps on public renderings and G's samples only (privacy argument, point 3)."""
        from monai.losses import DiceCELoss

        o = self.options
        gen = torch.Generator().manual_seed(seed)
        use_generated = round_index >= o.seg_generated_from_round and o.seg_generated_fraction > 0
        n_gen = int(round(o.seg_batch_size * o.seg_generated_fraction)) if use_generated else 0
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.Adam(model.seg.parameters(), lr=o.seg_lr)
        _restore(opt, local_state, "opt_seg")
        model.seg.to(device).train()
        total = 0.0
        for _ in range(o.seg_steps_per_round):
            images, labels = self.public_batch(model, public, o.seg_batch_size - n_gen, n_gen, gen)
            loss = loss_fn(model.seg(images.to(device)), labels[:, None].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        model.seg.eval()
        local_state["opt_seg"] = _cpu_copy(opt.state_dict())
        return {"loss_seg_public": total / o.seg_steps_per_round, "seg_generated": float(n_gen)}

    def public_batch(self, model: BridgeModel, public: PublicData, n_render: int, n_generated: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, label maps): random-contrast renderings of public maps, then G's samples
        of public maps at random sites. Built from ``public`` and G only."""
        labels = public.draw(n_render, generator=gen).long()
        images = render_random_contrast(labels, gen, RandomContrast())
        if n_generated:
            maps = public.draw(n_generated, generator=gen).long()
            sites = torch.randint(0, self.num_sites, (n_generated,), generator=gen)
            fake = self.foundation.sample(model.cgan, maps, sites, generator=gen).cpu()
            images, labels = torch.cat([images, fake]), torch.cat([labels, maps])
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        return (torch.where(flip[:, None, None, None], images.flip(-1), images),
                torch.where(flip[:, None, None], labels.flip(-1), labels))

    # -- using the trained model ---------------------------------------------------------
    def sample(self, model, label_maps, site_index, generator=None):
        return self.foundation.sample(model.cgan, label_maps, site_index, generator)

    def site_style(self, model: BridgeModel, public: PublicData, site_index: int,
                   seed: int = 0) -> SiteStyle:
        """A site's style measured on G's samples of public maps (free: post-processing)."""
        gen = torch.Generator().manual_seed(seed * 1_000 + site_index)
        maps = public.draw(self.options.style_samples, generator=gen).long()
        fake = self.sample(model, maps, torch.full((maps.shape[0],), site_index), generator=gen)
        return style_from_images(fake.cpu(), maps)

    def site_styles(self, model: BridgeModel, public: PublicData, seed: int = 0) -> dict[str, SiteStyle]:
        return {name: self.site_style(model, public, k, seed)
                for k, name in enumerate(self.config.site_names)}

    def gan_translate(self, model: BridgeModel, images: torch.Tensor, target_index: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The plain bridge: x -> argmax S(x) -> G(., target) (no texture carried)."""
        labels = predict_probs(model.seg, images).argmax(dim=1)
        return self.sample(model, labels, torch.full((labels.shape[0],), target_index), generator).cpu()
