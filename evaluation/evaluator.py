"""Centralised evaluation of a generator on the coordinator's held-out data.

``Evaluator.prepare`` loads heldout/fit and heldout/test, trains (or loads from cache)
the feature extractor and the site classifier on heldout/fit ONLY, and precomputes the
real reference features and the real-vs-real floors. ``evaluate`` then scores a recipe's
model per site (see heldout_split.py for the like-for-like design).

The set-metric panel (metric_panel.py) comes first in the report: SWD, power spectrum,
per-tissue intensity and texture, random-feature KID and precision/recall/density/
coverage, each beside its floor and interval; its HEADLINE metrics are the ones that
passed the sanity suite on real images (docs/evaluation.md). The keys below are the
older trained-encoder numbers, kept for comparison with earlier runs; FD_medgenenc-v1 is
NOT a headline metric: it misses added noise and texture loss (bench/metric_sanity.py).

    fd/<site>        FD_medgenenc-v1(G(maps of half 1, site), real half 2)
    fd_floor/<site>  FD_medgenenc-v1(real half 1, real half 2), same N, same anatomy
    kid/<site>, kid_lo/<site>, kid_hi/<site>   KID and its 95 % bootstrap interval
    kid_floor/<site> KID(real half 1, real half 2)
    site_acc/<site>  site-classifier accuracy on G(., site) labelled with that site
    nonfinite/<site> fraction of generated pixels that were NaN/inf (set to 0 before scoring)
    n_gen/<site>, n_ref/<site>, seed/<site>    sample counts and the sampling seed
    fd_mean, fd_floor_mean, kid_mean, site_acc_mean   means over sites
Keys for means carry no "/" so they can never collide with a site name.

Conditioning: generation uses held-out TEST label maps (the conditioning half), never a
site's training data; that costs no privacy and lets FD compare like with like.
The evaluator's training seed is fixed (not the run seed), so every run evaluated on
the same held-out data and medgen version uses byte-identical evaluator weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import medgen
from medgen.atomic import atomic_torch_save, atomic_write_json
from medgen.config import ConfigError, RunConfig
from medgen.evaluation.feature_metrics import frechet_distance, kid, kid_with_ci
from medgen.data.manifest import load_manifest
from medgen.evaluation.hashing import state_dict_sha256, tensors_sha256
from medgen.evaluation.heldout_split import SplitSite, load_split, split_by_subject
from medgen.evaluation.metric_panel import MetricPanel
from medgen.evaluation.networks import (FeatureNet, SiteClassifier, TrainSettings,
                                        train_feature_net, train_site_classifier)
from medgen.evaluation.sample_grid import GrayDisplay, render_grid
from medgen.evaluation.tissue_intensity import TissueUnits

logger = logging.getLogger(__name__)

EXTRACTOR_VERSION = "medgenenc-v1"
EVALUATOR_SEED = 0          # fixed on purpose: comparable across runs (module docstring)
KID_BOOTSTRAP = 200
GRID_COLUMNS = 6


@dataclass
class Evaluator:
    config: RunConfig
    sites: tuple[str, ...]
    extractor: FeatureNet
    classifier: SiteClassifier
    extractor_sha256: str
    classifier_sha256: str
    floor: dict[str, float]
    kid_floor: dict[str, float]
    classifier_real_acc: dict[str, float]
    split: dict[str, SplitSite] = field(repr=False)
    ref_features: dict[str, torch.Tensor] = field(repr=False)
    num_eval: dict[str, int]
    cache_path: Path
    panel: MetricPanel = field(repr=False)
    extractor_name: str = f"FD_{EXTRACTOR_VERSION}"
    displays: dict[str, GrayDisplay] = field(default_factory=dict)   # grid grey levels per site

    # -- preparation --------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: RunConfig, heldout_root: Path, cache_dir: Path,
                settings: TrainSettings | None = None) -> "Evaluator":
        settings = settings or TrainSettings()
        if config.eval_samples < 2:
            raise ConfigError(f"run-config field 'eval-samples' is {config.eval_samples}; a feature "
                              "distance needs at least 2 generated images per site")
        sites, size = config.site_names, config.image_size
        heldout_root, cache_dir = Path(heldout_root), Path(cache_dir)
        fit = load_split(heldout_root, "fit", size, sites, cache_dir)
        test = load_split(heldout_root, "test", size, sites, cache_dir)
        fit_images = torch.cat([fit[s].images for s in sites])
        fit_labels = torch.cat([fit[s].labels for s in sites])
        fit_sites = torch.cat([torch.full((len(fit[s].images),), k) for k, s in enumerate(sites)])
        classes = config.num_classes
        key = _cache_key(settings, size, sites, tensors_sha256(fit_images, fit_labels, fit_sites), classes)
        cache_path = cache_dir / f"evaluator-{key[:32]}.pt"
        nets = _load_cached(cache_path, key, len(sites), settings, classes)
        if nets is None:
            start = time.perf_counter()
            extractor = train_feature_net(fit_images, fit_labels, fit_sites, len(sites), settings,
                                          EVALUATOR_SEED, num_classes=classes)
            classifier = train_site_classifier(fit_images, fit_sites, len(sites), settings, EVALUATOR_SEED)
            seconds = time.perf_counter() - start
            atomic_torch_save(cache_path, {
                "key": key, "extractor": extractor.state_dict(), "classifier": classifier.state_dict(),
                "extractor_sha256": state_dict_sha256(extractor),
                "classifier_sha256": state_dict_sha256(classifier), "train_seconds": seconds})
            logger.info("trained evaluation networks on %d held-out fit images in %.1f s; cached at %s",
                        len(fit_images), seconds, cache_path)
        else:
            extractor, classifier = nets
        split = {s: split_by_subject(s, test[s]) for s in sites}
        num_eval = {s: min(config.eval_samples, len(split[s].cond_images)) for s in sites}
        ref = {s: extractor.features(split[s].ref_images) for s in sites}
        floor, kid_floor, real_acc = {}, {}, {}
        for k, s in enumerate(sites):
            cond_feats = extractor.features(split[s].cond_images[:num_eval[s]])
            floor[s] = frechet_distance(cond_feats, ref[s])
            kid_floor[s] = kid(cond_feats, ref[s])
            real_acc[s] = float((classifier.predict(test[s].images) == k).float().mean())
        intensity = {s: site_intensity(heldout_root, s) for s in sites}
        units = {s: u for s, (u, _) in intensity.items()}
        displays = {s: d for s, (_, d) in intensity.items()}
        panel = MetricPanel.prepare(split, num_eval, config.class_names, units)
        return cls(config=config, sites=sites, extractor=extractor, classifier=classifier,
                   extractor_sha256=state_dict_sha256(extractor),
                   classifier_sha256=state_dict_sha256(classifier), floor=floor,
                   kid_floor=kid_floor, classifier_real_acc=real_acc, split=split,
                   ref_features=ref, num_eval=num_eval, cache_path=cache_path, panel=panel,
                   displays=displays)

    # -- scoring ------------------------------------------------------------------------
    def sampling_seed(self, server_round: int, site_index: int, purpose: str = "eval") -> int:
        """Deterministic per (run seed, round, site, purpose); 48 bits so it is exact as a float."""
        text = f"{purpose}:{self.config.seed}:{server_round}:{site_index}".encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:6], "big")

    @torch.no_grad()
    def generate(self, recipe: Any, model: torch.nn.Module, label_maps: torch.Tensor,
                 site_index: int, seed: int) -> tuple[torch.Tensor, float]:
        """Images [N,1,H,W] on the CPU (non-finite pixels zeroed) and the non-finite fraction."""
        was_training = model.training
        model.eval()
        device = next(iter(model.parameters()), torch.empty(0)).device
        generator = torch.Generator(device=device).manual_seed(seed)
        sites = torch.full((len(label_maps),), site_index, dtype=torch.long, device=device)
        try:
            images = recipe.sample(model, label_maps.to(device), sites, generator=generator)
        finally:
            model.train(was_training)
        images = images.detach().to("cpu", torch.float32)
        expected = (len(label_maps), 1, *label_maps.shape[-2:])
        if tuple(images.shape) != expected:
            raise ValueError(f"recipe '{getattr(recipe, 'name', type(recipe).__name__)}'.sample returned "
                             f"shape {tuple(images.shape)}; expected {expected} ([N,1,H,W])")
        finite = torch.isfinite(images)
        nonfinite = 1.0 - float(finite.float().mean())
        return torch.where(finite, images, torch.zeros_like(images)).clamp(-1, 1), nonfinite

    def evaluate(self, recipe: Any, model: torch.nn.Module, server_round: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for k, site in enumerate(self.sites):
            n, seed = self.num_eval[site], self.sampling_seed(server_round, k)
            maps = self.split[site].cond_labels[:n]
            images, nonfinite = self.generate(recipe, model, maps, k, seed)
            metrics.update(self.panel.score(site, images, maps, seed))
            feats = self.extractor.features(images)
            estimate = kid_with_ci(feats, self.ref_features[site], bootstrap=KID_BOOTSTRAP, seed=seed)
            metrics.update({
                f"fd/{site}": frechet_distance(feats, self.ref_features[site]),
                f"fd_floor/{site}": self.floor[site],
                f"kid/{site}": estimate.value, f"kid_lo/{site}": estimate.low,
                f"kid_hi/{site}": estimate.high, f"kid_floor/{site}": self.kid_floor[site],
                f"site_acc/{site}": float((self.classifier.predict(images) == k).float().mean()),
                f"nonfinite/{site}": nonfinite, f"n_gen/{site}": float(n),
                f"n_ref/{site}": float(len(self.ref_features[site])), f"seed/{site}": float(seed)})
        for name in ("fd", "fd_floor", "kid", "site_acc"):
            metrics[f"{name}_mean"] = sum(metrics[f"{name}/{s}"] for s in self.sites) / len(self.sites)
        return metrics

    def write_sample_grid(self, recipe: Any, model: torch.nn.Module, server_round: int,
                          path: Path) -> None:
        """PNG: a header row of label maps, then one row per site (its paired real scan first),
        each site in its own grey mapping (a CT site through the manifest's fixed display window).

        Beside it, ``<name>.tissue.json``: the per-tissue intensity histograms (real
        reference vs generated) of the last ``evaluate``, for the report's histogram charts.
        """
        if self.panel.last_histograms:
            atomic_write_json(Path(path).with_suffix(".tissue.json"), self.panel.last_histograms)
        first = self.split[self.sites[0]]
        cols = min(GRID_COLUMNS, len(first.cond_labels))
        maps = first.cond_labels[:cols]
        rows = []
        for k, site in enumerate(self.sites):
            images, _ = self.generate(recipe, model, maps, k, self.sampling_seed(server_round, k, "grid"))
            rows.append((site, self.split[site].cond_images[0, 0], images[:, 0]))
        render_grid(maps, rows, Path(path), self.displays)

    # -- provenance -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the report prints about the evaluator (JSON-serialisable)."""
        return {"extractor_name": self.extractor_name, "extractor_sha256": self.extractor_sha256,
                "classifier_sha256": self.classifier_sha256, "evaluator_seed": EVALUATOR_SEED,
                "medgen_version": medgen.__version__, "sites": list(self.sites),
                "floor": self.floor, "kid_floor": self.kid_floor,
                "classifier_real_acc": self.classifier_real_acc, "num_eval": self.num_eval,
                "num_ref": {s: len(v) for s, v in self.ref_features.items()},
                "kid_bootstrap": KID_BOOTSTRAP, "cache_file": self.cache_path.name,
                "conditioning": "label maps of half of the heldout/test subjects; reference: "
                                "real images of the other half", "panel": self.panel.info(),
                "display": {s: d.to_dict() for s, d in self.displays.items()}}

    def write_info(self, path: Path) -> None:
        atomic_write_json(path, self.info())


def site_intensity(heldout_root: Path, site: str) -> tuple[TissueUnits, GrayDisplay]:
    """From the site's manifest: the units tissue distances are reported in (HU, or the
    manifest's unit, for a fixed-window site; normalised otherwise) and how its images are
    shown (the fixed display window, or the whole normalised range)."""
    policy = load_manifest(heldout_root / "test" / site, root=heldout_root.parent).intensity
    if policy.normalisation == "window" and policy.window:
        units = TissueUnits.from_window(*policy.window, name=policy.units)
        return units, GrayDisplay(units=units, window=policy.display)
    return TissueUnits(), GrayDisplay()


def _cache_key(settings: TrainSettings, image_size: int, sites: tuple[str, ...], data_sha256: str,
               num_classes: int) -> str:
    payload = {"extractor": EXTRACTOR_VERSION, "medgen": medgen.__version__, "torch": torch.__version__,
               "settings": settings.as_dict(), "image_size": image_size, "sites": list(sites),
               "seed": EVALUATOR_SEED, "data": data_sha256, "classes": num_classes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, key: str, num_sites: int, settings: TrainSettings,
                 num_classes: int) -> tuple[FeatureNet, SiteClassifier] | None:
    """Cached nets, or None (absent, unreadable or failing its hash: retrain; a cache is derivable)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        extractor = FeatureNet(num_sites, settings.widths, settings.feature_dim, num_classes)
        extractor.load_state_dict(blob["extractor"])
        classifier = SiteClassifier(num_sites, settings.widths)
        classifier.load_state_dict(blob["classifier"])
        if (blob["key"] != key or state_dict_sha256(extractor) != blob["extractor_sha256"]
                or state_dict_sha256(classifier) != blob["classifier_sha256"]):
            raise ValueError("key or weight hash mismatch")
    except Exception as err:  # noqa: BLE001 - any damage means: rebuild it
        logger.warning("evaluator cache %s is unusable (%s); retraining", path, err)
        return None
    return extractor.eval(), classifier.eval()
