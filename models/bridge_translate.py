"""bridge-translate: cross-site translation through the tissue label map, DP only on D.

A foundation G(label map, site) (the dp-cgan recipe, by composition), a contrast-agnostic
segmenter S trained on public data only, and each site's style (tissue means and blur,
``SiteStyle``) from a one-off DP release of its own statistics (or else measured on G's
samples). Whoever holds an image translates it locally: S's tissue probabilities, the
target site's style, the source's texture carried over (models/site_style.py has the
formula). ``gan_translate`` is the plain bridge x -> argmax S(x) -> G(., t), kept for
comparison. Design and measurements: docs/recipes/translation.md.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD", "Conditioning"). Unit: the patient.
Three mechanisms read a site's records, all accounted in the site's ONE accountant history
(its PrivacyLedger): DP-SGD on D (point 1), the foundation's scanner-moment release
(dp_cgan, point 4) and one Gaussian release of style statistics (point 4 below). The
plan's DP-SGD noise is calibrated once for their composition (``one_off_releases`` ->
``PrivacyRound``), so the site's total epsilon is <= the target.
  1. ``cgan.disc`` (D) is the ONLY network that reads private records: the foundation
     recipe trains it through ``DPModule`` over ``PrivateTraining`` only: Poisson sampling
     of patients, per-patient clipping, noise at the plan's fixed multiplier, the
     accountant the plan names.
  2. ``cgan.gen`` (G) is updated from public label maps, site ids, noise and D's
     released parameters only (dp_cgan's module docstring, point 3): post-processing.
  3. ``seg`` (S; an ensemble when ``seg-init`` names several files) starts from
     ``options.seg-init`` (trained by the coordinator on public renderings only, ``medgen
     pretrain-segmenter``; loaded by ``initialise`` on the server) or else
     ``pretrain_segmenter`` (first round; public renderings only), and is updated by
     ``public_segmenter_update``, whose inputs are (a) random-contrast renderings of
     PUBLIC label maps (medgen.sim.random_contrast) and (b) G's samples with the public
     label maps that conditioned them. It receives no site data at all (its signature has
     no dataset): post-processing of DP outputs and public data. tests/models/
     test_bridge_translate.py checks that S's update is identical for two models whose D
     (the only data-dependent part) differs.
  4. The style release (``style-release``, once per site, in its first round, before its
     DP-SGD steps): per patient one vector of its own tissue means, area weights and
     blur, of L2 norm <= style_clip(K) for the K classes of the schema, summed, plus Gaussian noise (sensitivity argument in
     models/site_style.py), accounted as (style-noise-multiplier, 1.0, 1). The ledger
     stores the noisy sum; row k of ``style_release`` (site k's row only) carries it to
     the federation (every site may translate into every other site's style). The style
     computed from it, the server's copy, translation: post-processing. It is never
     spent twice (``Recipe.release_once``). Without it the styles are measured on G's
     samples of public maps (free). The statistics of an image being translated are
     computed by its holder, at translation time, and never leave it.
  5. Returned metrics are those of dp_cgan (public-input losses only) plus S's loss on
     public/generated batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.losses import DiceCELoss
from torch import nn

from medgen.config import ConfigError
from medgen.models.dp_cgan import CGANOptions, DPConditionalGAN
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData, Recipe, RoundContext
from medgen.models.round_context import keep_optimizer, restore_optimizer
from medgen.models.segmenter import (SegmenterSettings, build_segmenter, fit_segmenter, predict_probs,
                                     public_batches)
# the style helpers are part of this recipe's public surface (medgen translate, bench, tests)
from medgen.models.site_style import (SiteStyle, patient_style_statistics,  # noqa: F401
                                      style_clip, style_from_images, style_from_statistics,
                                      style_reference_counts, style_stat_dim, translate)
from medgen.sim.random_contrast import RandomContrast, render_random_contrast


@dataclass(frozen=True)
class BridgeOptions(CGANOptions):
    seg_pretrain_steps: int = option(600, at_least=0)  # first round: S on public renderings
    # S pretrained by the coordinator on public data (`medgen pretrain-segmenter`): paths on
    # the SERVER's disk, comma-separated (several: S is their ensemble); sites then skip
    # seg-pretrain-steps
    seg_init: str = ""
    seg_steps_per_round: int = option(10, at_least=0)
    seg_batch_size: int = option(32, at_least=2)
    seg_lr: float = option(1e-3, above=0)
    seg_generated_fraction: float = option(0.25, at_least=0, below=1)
    seg_generated_from_round: int = option(2, at_least=0)  # G's samples join S's batches then
    style_samples: int = option(64, at_least=4)
    style_release: bool = True  # SiteStyle from a DP release of the site's own statistics
    style_noise_multiplier: float = option(1.0, above=0)  # sigma of that release (x style_clip(K))
    # a patient's tissue mean counts fully once the tissue covers this quantile of the public
    # maps' areas (less below it); 0 = every patient having the tissue counts fully
    style_weight_quantile: float = option(0.5, at_least=0, at_most=1)

    @property
    def seg_init_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()).expanduser() for p in self.seg_init.split(",") if p.strip())


class BridgeModel(nn.Module):
    """``cgan`` = the foundation (gen shared, disc private), ``seg`` = S (public-trained, shared),
    ``style_release`` [sites, 2K+2] = each site's DP-released style statistics for the K
    classes of the label schema (row k written once by site k; all zeros until released;
    shared, site-indexed)."""

    def __init__(self, cgan: nn.Module, seg: nn.Module, num_sites: int = 0, *, num_classes: int):
        super().__init__()
        self.cgan = cgan
        self.seg = seg
        self.register_buffer("style_release", torch.zeros(num_sites, style_stat_dim(num_classes)))


class BridgeTranslator(Recipe):
    """Foundation G(label map, site) with DP D + public-trained S; see the module docstring."""

    name: ClassVar[str] = "bridge-translate"
    Options: ClassVar[type[RecipeOptions]] = BridgeOptions
    private_modules: ClassVar[tuple[str, ...]] = ("cgan.disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("cgan.gen.", "seg.", "style_release")
    # the style release and the foundation's per-site rows: row k comes from site k only
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("style_release",) + tuple(
        "cgan." + key for key in DPConditionalGAN.site_indexed_keys)

    def __init__(self, config):
        super().__init__(config)
        cgan_keys = {f.name.replace("_", "-") for f in dataclasses.fields(CGANOptions)}
        self.foundation = DPConditionalGAN(dataclasses.replace(
            config, options={k: v for k, v in config.options.items() if k in cgan_keys}))
        if self.options.share_discriminator:
            self.shared_prefixes = ("cgan.gen.", "seg.", "style_release", "cgan.disc.")
        self.seg_settings = SegmenterSettings(steps=max(1, self.options.seg_steps_per_round),
                                              batch_size=self.options.seg_batch_size,
                                              lr=self.options.seg_lr)

    def build(self) -> nn.Module:
        members = max(1, len(self.options.seg_init_paths))
        return BridgeModel(self.foundation.build(),
                           build_segmenter(self.seg_settings, self.config.seed + 1, members,
                                           num_classes=self.num_classes),
                           self.num_sites, num_classes=self.num_classes)

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        """The style release: one Gaussian mechanism, accounted as (sigma_style, 1.0, 1)."""
        own = ((float(self.options.style_noise_multiplier), 1.0, 1),) if self.options.style_release else ()
        return self.foundation.one_off_releases() + own  # the foundation G's moment release too

    def initialise(self, model: BridgeModel) -> None:
        """S from ``options.seg-init`` (public data only: no privacy cost), on the coordinator;
        several paths fill the ensemble's members in order."""
        paths = self.options.seg_init_paths
        members = list(model.seg.members) if len(paths) > 1 else [model.seg]
        for path, member in zip(paths, members):
            if not path.is_file():
                raise ConfigError(f"options.seg-init: {path} does not exist on the coordinator (give "
                                  f"an absolute path); make it with `medgen pretrain-segmenter "
                                  f"--public DATA/public --out {path}`")
            try:
                member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as err:  # a wrong file: say which, and what it should be
                raise ConfigError(f"options.seg-init: {path} is not a state dict of the bridge's "
                                  f"segmenter (channels {self.seg_settings.channels}, made by `medgen "
                                  f"pretrain-segmenter` at image-size {self.config.image_size}): "
                                  f"{type(err).__name__}: {str(err)[:300]}") from err

    # -- training ---------------------------------------------------------------------
    def train_local(self, model: BridgeModel, ctx: RoundContext) -> dict[str, float]:
        self.check_round(ctx)
        rounds_done = ctx.rounds_done
        if self.options.style_release:
            self.ensure_style_release(model, ctx)
        if rounds_done == 0 and self.options.seg_pretrain_steps > 0 and not self.options.seg_init:
            self.pretrain_segmenter(model, ctx.public, ctx.device)
        # the private part: D under DP-SGD, G as post-processing (dp_cgan, by composition)
        metrics = self.foundation.train_local(model.cgan, ctx)
        if self.options.seg_steps_per_round > 0:
            metrics.update(self.public_segmenter_update(model, ctx.public, rounds_done, ctx.recipe_state,
                                                        ctx.stream_seed(1), ctx.device))
        return metrics

    def ensure_style_release(self, model: BridgeModel, ctx: RoundContext) -> None:
        """Release this site's style statistics ONCE (privacy argument, point 4); the area
        weights' reference counts come from the public maps (``style-weight-quantile``)."""
        quantile, public = self.options.style_weight_quantile, ctx.public

        def statistics(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # only called when the release is made, so later rounds skip the public counts
            weighted = public is not None and quantile > 0
            reference = (style_reference_counts(public.label_maps, quantile, self.num_classes)
                         if weighted else None)
            return patient_style_statistics(images, labels, reference, num_classes=self.num_classes)

        self.release_once(model.style_release[ctx.site_index], ctx, statistics, style_clip(self.num_classes),
                          self.options.style_noise_multiplier,
                          no_labels_hint=" (set options.style-release = false to measure styles "
                                         "on the generator's samples instead)")

    def pretrain_segmenter(self, model: BridgeModel, public: PublicData, device: torch.device) -> None:
        """S on random-contrast renderings of public maps only; the seed does not depend on
        the site, so every site computes the same S from the same broadcast weights."""
        settings = SegmenterSettings(steps=self.options.seg_pretrain_steps, batch_size=16, lr=3e-3)
        model.seg.to(device)
        fit_segmenter(model.seg, public_batches(public.label_maps.long(), settings.batch_size,
                                                num_classes=self.num_classes),
                      settings, seed=self.config.seed + 1)

    def public_segmenter_update(self, model: BridgeModel, public: PublicData, round_index: int,
                                local_state: dict[str, Any], seed: int,
                                device: torch.device) -> dict[str, float]:
        """S steps on public renderings and G's samples only (privacy argument, point 3)."""
        o = self.options
        gen = torch.Generator().manual_seed(seed)
        use_generated = round_index >= o.seg_generated_from_round and o.seg_generated_fraction > 0
        n_gen = int(round(o.seg_batch_size * o.seg_generated_fraction)) if use_generated else 0
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.Adam(model.seg.parameters(), lr=o.seg_lr)
        restore_optimizer(opt, local_state, "opt_seg")
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
        keep_optimizer(opt, local_state, "opt_seg")
        return {"loss_seg_public": total / o.seg_steps_per_round, "seg_generated": float(n_gen)}

    def public_batch(self, model: BridgeModel, public: PublicData, n_render: int, n_generated: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, label maps): random-contrast renderings of public maps, then G's samples
        of public maps at random sites. Built from ``public`` and G only."""
        labels = public.draw(n_render, generator=gen).long()
        images = render_random_contrast(labels, gen, RandomContrast(), num_classes=self.num_classes)
        if n_generated:
            maps = public.draw(n_generated, generator=gen).long()
            sites = torch.randint(0, self.num_sites, (n_generated,), generator=gen)
            fake = self.foundation.sample(model.cgan, maps, sites, generator=gen).cpu()
            images, labels = torch.cat([images, fake]), torch.cat([labels, maps])
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        return (torch.where(flip[:, None, None, None], images.flip(-1), images),
                torch.where(flip[:, None, None], labels.flip(-1), labels))

    # -- using the trained model (capabilities: Translation, MembershipScores) -----------
    def sample(self, model, label_maps, site_index, generator=None):
        return self.foundation.sample(model.cgan, label_maps, site_index, generator)

    def membership_scores(self, model: BridgeModel, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int) -> torch.Tensor:
        """The audit's score: the foundation D's (the only private network)."""
        return self.foundation.membership_scores(model.cgan, images, labels, site_index)

    def translate_images(self, model: BridgeModel, images: torch.Tensor, source: SiteStyle,
                         target: SiteStyle) -> torch.Tensor:
        """Images [N,1,H,W] from ``source``'s style to ``target``'s, by their holder."""
        return translate(model.seg, images, source, target)

    def site_style(self, model: BridgeModel, public: PublicData, site_index: int,
                   seed: int = 0) -> SiteStyle:
        """A site's style: from its DP-released statistics when it has released them
        (``style-release``), else measured on G's samples. Both post-processing."""
        if self.options.style_release and self.has_released_style(model, site_index):
            return style_from_statistics(model.style_release[site_index])
        return self.generator_style(model, public, site_index, seed)

    @staticmethod
    def has_released_style(model: BridgeModel, site_index: int) -> bool:
        return bool(model.style_release[site_index].abs().sum() > 0)

    def generator_style(self, model: BridgeModel, public: PublicData, site_index: int,
                        seed: int = 0) -> SiteStyle:
        """A site's style measured on G's samples of public maps (free: post-processing)."""
        gen = torch.Generator().manual_seed(seed * 1_000 + site_index)
        maps = public.draw(self.options.style_samples, generator=gen).long()
        fake = self.sample(model, maps, torch.full((maps.shape[0],), site_index), generator=gen)
        return style_from_images(fake.cpu(), maps, self.num_classes)

    def site_styles(self, model: BridgeModel, public: PublicData, seed: int = 0) -> dict[str, SiteStyle]:
        return {name: self.site_style(model, public, k, seed)
                for k, name in enumerate(self.config.site_names)}

    def generator_styles(self, model: BridgeModel, public: PublicData, seed: int = 0) -> dict[str, SiteStyle]:
        return {name: self.generator_style(model, public, k, seed)
                for k, name in enumerate(self.config.site_names)}

    def gan_translate(self, model: BridgeModel, images: torch.Tensor, target_index: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The plain bridge: x -> argmax S(x) -> G(., target) (no texture carried)."""
        labels = predict_probs(model.seg, images).argmax(dim=1)
        return self.sample(model, labels, torch.full((labels.shape[0],), target_index), generator).cpu()
