"""bridge-translate: cross-site translation through the tissue label map, DP only on D.

Translation of an image x from site s to site t, done locally by whoever holds x:

    p = S(x)                                 soft tissue probabilities (contrast-agnostic S)
    m_s = per-tissue means of x under p      (x's own statistics: never leave the caller)
    r = x - sum_k p_k m_s[k]                 x's within-tissue texture and partial volume,
                                             smoothed 0.7 px (noise) and detrended at 4 px (bias)
    y = sum_k p_k M_t[k] + g * r             target contrast, source texture carried over
    y = blur(y, sqrt(b_t^2 - b_s^2))         target resolution

where M_t, b_t (tissue means and blur of site t) and b_s are the SiteStyle of each site,
computed from that site's one-off DP release of its own per-patient tissue statistics
(``style-release``, the default; point 4 below) or else measured on samples of the
foundation generator G(public label map, site), and g is the
least-squares slope of the target tissue means on the source tissue means (the first-
order map of a within-tissue intensity deviation: negative for T1 -> T2, so texture and
partial volume flip with the contrast). ``BridgeTranslator.gan_translate`` is the plain
bridge x -> argmax S(x) -> G(., t) of the issue, kept for comparison.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD", "Conditioning"). Unit: the patient.
Two mechanisms read a site's records, both accounted in the site's ONE accountant history
(its PrivacyLedger): DP-SGD on D (point 1) and one Gaussian release of style statistics
(point 4). The plan's DP-SGD noise is calibrated once for their composition
(``one_off_releases`` -> ``PrivacyLedger.ensure_plan``), so the site's total epsilon is
<= the target.
  1. ``cgan.disc`` (D) is the ONLY network that reads private records: the foundation
     recipe (medgen.models.dp_cgan, reused by composition) trains it through
     ``PrivateTraining`` only: Poisson sampling of patients, per-patient clipping, noise
     at the plan's fixed multiplier, the accountant the plan names.
  2. ``cgan.gen`` (G) is updated from public label maps, site ids, noise and D's
     released parameters only (dp_cgan's module docstring, point 3): post-processing.
  3. ``seg`` (S; an ensemble when ``seg-init`` names several files) starts from
     ``options.seg-init`` (trained by the coordinator on public renderings only, ``medgen
     pretrain-segmenter``; loaded by ``initialise`` on the server) or else ``pretrain_segmenter`` (first round; public renderings only), and is
     updated by ``public_segmenter_update``, whose inputs are
     (a) random-contrast renderings of PUBLIC label maps (medgen.sim.random_contrast) and
     (b) G's samples with the public label maps that conditioned them. It receives no
     site data at all (its signature has no dataset), so it is post-processing of DP
     outputs and public data. tests/models/test_bridge_translate.py checks that S's
     update is identical for two models whose D (the only data-dependent part) differs.
  4. SiteStyle release (``ensure_style_release``, once per site, in its first round,
     before its DP-SGD steps). Per patient i (one dataset item = one patient) the vector
     v_i = [1, m_ik w_ik (k = 0..3), w_ik (k = 0..3), b_i / 3] (``patient_style_statistics``:
     m_ik = its mean intensity in tissue k, w_ik = min(1, n_ik / r_k) with n_ik the pixels
     of tissue k in its label map and r_k the median area of tissue k over the PUBLIC maps
     (``style_reference_counts``: public constants, identical at every site; with
     ``style-weight-quantile = 0`` w_ik = 1 if tissue k occurs), b_i = the BLUR_GRID blur
     best fitting its own image), computed from patient i's record alone. Images are in
     [-1, 1] and w_ik in [0, 1], so ||v_i|| <= sqrt(10) = STYLE_CLIP; v_i is clipped to
     STYLE_CLIP anyway, so adding or removing one patient moves S = sum_i v_i by at most
     STYLE_CLIP (L2 sensitivity). Released: S + N(0, (sigma_style STYLE_CLIP)^2 I), the
     Gaussian mechanism (``PrivateTraining.gaussian_release``, same noise source as
     DP-SGD), accounted as the Opacus history entry (sigma_style, sample_rate 1.0, 1 step)
     in the same accountant (PRV: PoissonSubsampledGaussianPRV at q = 1 is exactly the
     Gaussian mechanism's privacy-loss distribution; RDP: its closed form). The noisy S
     is written to row k of ``style_release`` (site k's row only), kept in the node's
     local state and shared with the federation (every site may translate into every
     other site's style). Everything after it is post-processing: the style
     (``style_from_statistics``: means = noisy weighted sums / noisy sums of weights,
     blur = noisy mean best blur), the server's copy of the row, translation. A second
     release never spends again: an existing row or local copy is reused, and failing
     those ``gaussian_release`` returns the values the ledger stored with the spent entry
     (or refuses, without them). Without ``style-release`` the
     styles are measured on G's samples of public maps (free). The per-image statistics
     m_s, r of the image being translated are computed by its holder, at translation time,
     and never leave it.
  5. Returned metrics are those of dp_cgan (public-input losses only) plus S's loss on
     public/generated batches.
``style_from_images`` measures a style on REAL labelled images centrally: evaluation uses
it for the non-private ceiling only; it is never called by ``train_local``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
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
# the released per-patient statistic: [1, mean_k * present_k (4), present_k (4), blur / 3]
STYLE_STAT_DIM = 2 * NUM_CLASSES + 2
STYLE_CLIP = math.sqrt(STYLE_STAT_DIM)  # every in-range vector has norm <= sqrt(10): never clipped


@dataclass(frozen=True)
class BridgeOptions(CGANOptions):
    seg_pretrain_steps: int = 600  # first round: S on public renderings (same at every site)
    # S pretrained by the coordinator on public data (`medgen pretrain-segmenter`): a path on
    # the SERVER's disk, loaded into the initial model and shipped in round 1; the sites
    # then skip seg-pretrain-steps. Several comma-separated paths: S is their ensemble
    seg_init: str = ""

    @property
    def seg_init_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()).expanduser() for p in self.seg_init.split(",") if p.strip())
    seg_steps_per_round: int = 10
    seg_batch_size: int = 32
    seg_lr: float = 1e-3
    seg_generated_fraction: float = 0.25
    seg_generated_from_round: int = 2  # G's samples join S's batches from this round on
    style_samples: int = 64
    style_release: bool = True  # SiteStyle from a DP release of the site's own statistics
    style_noise_multiplier: float = 1.0  # sigma of that one Gaussian release (x STYLE_CLIP)
    # a patient's tissue mean counts fully once the tissue covers this quantile of the public
    # maps' areas (less below it); 0 = every patient having the tissue counts fully
    style_weight_quantile: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seg_steps_per_round < 0 or self.seg_batch_size < 2 or self.style_samples < 4:
            raise ConfigError("options.seg-steps-per-round must be >= 0, seg-batch-size >= 2, "
                              "style-samples >= 4")
        if not (self.style_noise_multiplier > 0 and math.isfinite(self.style_noise_multiplier)):
            raise ConfigError("options.style-noise-multiplier must be a finite number > 0")
        if not 0.0 <= self.style_weight_quantile <= 1.0:
            raise ConfigError("options.style-weight-quantile must be in [0, 1]")
        if not 0.0 <= self.seg_generated_fraction < 1.0:
            raise ConfigError("options.seg-generated-fraction must be in [0, 1)")


class BridgeModel(nn.Module):
    """``cgan`` = the foundation (gen shared, disc private), ``seg`` = S (public-trained, shared),
    ``style_release`` [sites, STYLE_STAT_DIM] = each site's DP-released style statistics
    (row k written once by site k; all zeros until released; shared, site-indexed)."""

    def __init__(self, cgan: nn.Module, seg: nn.Module, num_sites: int = 0):
        super().__init__()
        self.cgan = cgan
        self.seg = seg
        self.register_buffer("style_release", torch.zeros(num_sites, STYLE_STAT_DIM))


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


def patient_style_statistics(images: torch.Tensor, labels: torch.Tensor,
                             reference_counts: torch.Tensor | None = None) -> torch.Tensor:
    """One statistic vector per patient (one row per image [N,1,H,W] with label map [N,H,W]):

        [1, m_0 w_0, ..., m_3 w_3, w_0, ..., w_3, b / 3]

    m_k = the image's mean intensity in tissue class k (0 if absent), w_k its weight: 1 if
    class k occurs in its label map, or with ``reference_counts`` [4] (public constants)
    min(1, n_k / reference_counts[k]) for a class covering n_k pixels, so a patient whose
    tissue is a thin, partial-volume-dominated sliver counts less (the released mean moves
    toward the pixel-pooled mean; see ``style_reference_counts``). b = the blur of
    BLUR_GRID (0..3 px) minimising the MSE between the image and its own flat tissue
    rendering blurred by b. Computed from that patient's image and labels alone; w_k is in
    [0, 1] and images are in [-1, 1], so its L2 norm is <= sqrt(10) = STYLE_CLIP. float64."""
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair")
    n = images.shape[0]
    x = images[:, 0].double()
    onehot = torch.nn.functional.one_hot(labels.long(), NUM_CLASSES).permute(0, 3, 1, 2).double()
    count = onehot.sum(dim=(2, 3))
    weight = (count > 0).double()
    if reference_counts is not None:
        weight = (count / reference_counts.double().clamp(min=1.0)).clamp(max=1.0)
    means = (onehot * x[:, None]).sum(dim=(2, 3)) / count.clamp(min=1.0)
    flat = (onehot * means[:, :, None, None]).sum(dim=1, keepdim=True).float()
    errors = torch.stack([((gaussian_blur(flat, torch.full((n,), s)) - images.float()) ** 2).mean(dim=(1, 2, 3))
                          for s in BLUR_GRID], dim=1)
    best = torch.tensor(BLUR_GRID, dtype=torch.float64)[errors.argmin(dim=1)]
    return torch.cat([torch.ones(n, 1, dtype=torch.float64), means * weight, weight,
                      (best / BLUR_GRID[-1])[:, None]], dim=1)


def style_reference_counts(public_label_maps: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per tissue class, the ``quantile`` of its pixel count over the PUBLIC label maps: the
    area above which a patient's tissue mean counts fully in the style release. Public data
    only, identical at every site, so it costs no privacy and changes no sensitivity."""
    counts = torch.nn.functional.one_hot(public_label_maps.long(), NUM_CLASSES).sum(dim=(1, 2)).double()
    return torch.quantile(counts, quantile, dim=0)


def style_from_statistics(total: torch.Tensor) -> SiteStyle:
    """A SiteStyle from a (noisy) sum of ``patient_style_statistics`` rows: post-processing.

    Tissue mean k = weighted sum of per-patient means / sum of their weights; blur = mean
    per-patient best blur. Noisy counts are floored at 1, means clamped to [-1, 1],
    the blur to the grid's range."""
    t = [float(v) for v in total]
    if len(t) != STYLE_STAT_DIM:
        raise ValueError(f"style statistics have {len(t)} entries, expected {STYLE_STAT_DIM}")
    k = NUM_CLASSES
    means = tuple(min(1.0, max(-1.0, t[1 + c] / max(t[1 + k + c], 1.0))) for c in range(k))
    blur = min(BLUR_GRID[-1], max(0.0, t[-1] / max(t[0], 1.0) * BLUR_GRID[-1]))
    return SiteStyle(means, blur)


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
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("cgan.gen.", "seg.", "style_release")
    # row k of the released style statistics comes from site k's reply only
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
                           build_segmenter(self.seg_settings, self.config.seed + 1, members),
                           self.num_sites)

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
    def train_local(self, model, data, public, private, site_index, steps, local_state, device):
        self.check_train_args(site_index, steps)
        rounds_done = int(local_state.get("rounds_trained", 0))
        if self.options.style_release:
            self.ensure_style_release(model, data, private, site_index, local_state, public)
        if rounds_done == 0 and self.options.seg_pretrain_steps > 0 and not self.options.seg_init:
            self.pretrain_segmenter(model, public, torch.device(device))
        # the private part: D under DP-SGD, G as post-processing (dp_cgan, by composition)
        metrics = self.foundation.train_local(model.cgan, data, public, private, site_index,
                                              steps, local_state, device)
        if self.options.seg_steps_per_round > 0:
            seed = (self.config.seed * 7_919 + site_index * 104_729 + rounds_done) % 2**63
            metrics.update(self.public_segmenter_update(model, public, rounds_done, local_state,
                                                        seed, torch.device(device)))
        return metrics

    def ensure_style_release(self, model: BridgeModel, data, private, site_index: int,
                             local_state: dict[str, Any], public: PublicData | None = None) -> None:
        """Release this site's style statistics ONCE (privacy argument, point 4).

        ``Recipe.release_once``: reused if the node kept it in ``local_state`` or the row
        came back from the server set; otherwise one row per patient of ``data`` ->
        ``private.gaussian_release`` (clip to STYLE_CLIP, sum, noise, accounted as
        (style-noise-multiplier, 1.0, 1)) -> row ``site_index`` only. The area weights'
        reference counts come from the public maps (``style-weight-quantile``)."""
        quantile = self.options.style_weight_quantile

        def statistics(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # only called when the release is made, so later rounds skip the public counts
            weighted = public is not None and quantile > 0
            reference = style_reference_counts(public.label_maps, quantile) if weighted else None
            return patient_style_statistics(images, labels, reference)

        self.release_once(model.style_release[site_index], data, private, local_state,
                          "style_release", statistics, STYLE_CLIP,
                          self.options.style_noise_multiplier,
                          no_labels_hint=" (set options.style-release = false to measure styles "
                                         "on the generator's samples instead)")

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
        return style_from_images(fake.cpu(), maps)

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
