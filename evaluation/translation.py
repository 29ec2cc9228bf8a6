"""Ground-truth evaluation of cross-site translation on the paired held-out set.

For every ordered site pair (source -> target) and every method, on ``heldout/test``:
- PSNR, SSIM and MAE inside the brain box (medgen.sim.brain_box of the subject's labels)
  against the noise-free TARGET rendering of the same subject (``clean``), all on the
  client's [-1, 1] scale (data range 2; PSNR equals DATA.md's [0, 1] numbers);
- Dice (mean over CSF, GM, WM) of the translated image's labels as predicted by a
  segmenter trained on REAL target-site images (``heldout/fit`` of that site), and that
  Dice as a fraction of the same segmenter's Dice on the real target scans. A segmenter
  that works on every site could not tell a failed translation; this one scores an
  untranslated image low (EVALUATION.md item 4).

Classical baselines (DATA.md), fitted on ``heldout/fit`` only:
- ``identity``: the source image as is;
- ``hist-match``: histogram matching to the target site's pooled fit histogram;
- ``inv-hist-match``: the negated image matched, on its own foreground (pixels above
  FOREGROUND, i.e. 10 % of the robust range, as medgen.sim.baselines), to the target's
  tissue pixels (labels > 0), the background matched separately to the rest.

A translator is ``f(images [N,1,H,W] in [-1,1], source site, target site) -> images``;
it sees nothing of the subject but its source image. Every number carries its sample
count; ``write_translation_outputs`` writes the table and the grids.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from medgen.atomic import atomic_write_bytes, atomic_write_json
from medgen.evaluation.image_metrics import dice_per_class, mae, psnr, ssim
from medgen.models.segmenter import SegmenterSettings, predict_labels, train_on_images
from medgen.sim.brain_box import brain_box

DATA_RANGE = 2.0  # images live in [-1, 1]
FOREGROUND = -0.8  # 10 % of the [-1, 1] range: medgen.sim.baselines' 0.1 on [0, 1]
Translator = Callable[[torch.Tensor, str, str], torch.Tensor]
BASELINES = ("identity", "hist-match", "inv-hist-match")


def brain_masks(labels: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(brain_box(labels.numpy().astype(np.int64)))


# -- classical baselines ------------------------------------------------------------
@dataclass(frozen=True)
class SiteHistograms:
    """Pooled ``heldout/fit`` pixels of one site: all, tissue (labels > 0) and background."""

    pooled: np.ndarray
    inside: np.ndarray
    outside: np.ndarray

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor) -> "SiteHistograms":
        x = images[:, 0].numpy().astype(np.float64)
        tissue = labels.numpy() > 0
        return cls(x.ravel()[None], x[tissue][None], x[~tissue][None])


def classical_baselines(fit: Mapping[str, Any]) -> dict[str, Translator]:
    """identity, hist-match and inv-hist-match fitted on ``fit`` ({site: HeldoutSite})."""
    from skimage.exposure import match_histograms

    hist = {site: SiteHistograms.of(h.images, h.labels) for site, h in fit.items()}

    def hm(images, source, target):
        ref = hist[target].pooled
        out = [match_histograms(x[0].numpy().astype(np.float64), ref) for x in images]
        return torch.from_numpy(np.stack(out)[:, None]).float()

    def inverted(images, source, target):
        out = []
        for x in images:
            x = x[0].numpy().astype(np.float64)
            m = x > FOREGROUND
            y = np.zeros_like(x)
            y[m] = match_histograms(-x[m][None], hist[target].inside)[0]
            y[~m] = match_histograms(x[~m][None], hist[target].outside)[0]
            out.append(y)
        return torch.from_numpy(np.stack(out)[:, None]).float()

    return {"identity": lambda images, source, target: images.clone(),
            "hist-match": hm, "inv-hist-match": inverted}


# -- target-site segmenters -----------------------------------------------------------
def train_target_segmenters(fit: Mapping[str, Any], settings=None, seed: int = 0) -> dict[str, torch.nn.Module]:
    """One segmenter per site, trained on that site's REAL ``heldout/fit`` images only."""
    settings = settings or SegmenterSettings(steps=300, channels=(8, 16, 32, 64))
    return {site: train_on_images(h.images, h.labels, settings, seed=seed + 17 * k)
            for k, (site, h) in enumerate(sorted(fit.items()))}


def mean_tissue_dice(pred_labels: torch.Tensor, true_labels: torch.Tensor) -> float:
    scores = [v for v in dice_per_class(pred_labels, true_labels).values() if not np.isnan(v)]
    return float(np.mean(scores)) if scores else float("nan")


# -- the table --------------------------------------------------------------------
def score_pair(translated: torch.Tensor, target_site: Any, segmenter: torch.nn.Module | None,
               reference_dice: float | None) -> dict[str, float]:
    """Metrics of translated images against the target site's clean renderings."""
    if translated.shape != target_site.clean.shape:
        raise ValueError(f"translated images have shape {tuple(translated.shape)}, expected "
                         f"{tuple(target_site.clean.shape)} (one per held-out target image)")
    if not torch.isfinite(translated).all():
        raise ValueError("translated images hold NaN or inf")
    mask = brain_masks(target_site.labels)
    out = {"psnr": psnr(translated, target_site.clean, DATA_RANGE, mask),
           "ssim": ssim(translated, target_site.clean, DATA_RANGE, mask),
           "mae": mae(translated, target_site.clean, mask), "n": int(translated.shape[0])}
    if segmenter is not None:
        dice = mean_tissue_dice(predict_labels(segmenter, translated.clamp(-1, 1)), target_site.labels)
        out["dice"] = dice
        out["dice_fraction"] = dice / reference_dice if reference_dice else float("nan")
    return out


def evaluate_translation(test: Mapping[str, Any], translators: Mapping[str, Translator],
                         segmenters: Mapping[str, torch.nn.Module] | None = None,
                         pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """{"pairs": {"A->B": {method: metrics}}, "reference_dice": {site: Dice on real}, ...}.

    ``test`` maps site -> HeldoutSite of ``heldout/test``; rows must be the same subjects
    at every site (checked), since the target's clean rendering is the ground truth.
    """
    sites = sorted(test)
    pairs = pairs or [(s, t) for s in sites for t in sites if s != t]
    for s, t in pairs:
        if test[s].subjects != test[t].subjects:
            raise ValueError(f"held-out sites {s} and {t} do not hold the same subjects in the same "
                             "order; paired evaluation needs heldout/<split>/<site> of one build")
    segmenters = segmenters or {}

    reference = {t: mean_tissue_dice(predict_labels(segmenters[t], test[t].images), test[t].labels)
                 for t in sorted({t for _, t in pairs}) if t in segmenters}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for s, t in pairs:
        row = {}
        for name, fn in translators.items():
            translated = fn(test[s].images.clone(), s, t).float()
            row[name] = score_pair(translated, test[t], segmenters.get(t), reference.get(t))
        table[f"{s}->{t}"] = row
    return {"pairs": table, "reference_dice": reference, "n": int(test[sites[0]].images.shape[0]),
            "methods": list(translators), "metric_notes": __doc__.split("\n\n")[1]}


def acceptance(results: Mapping[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """Per pair: does ``method`` beat the best classical baseline in SSIM, and reach
    Dice >= 0.9 of the target segmenter's Dice on real images?"""
    out = {}
    for pair, row in results["pairs"].items():
        best = max((b for b in BASELINES if b in row), key=lambda b: row[b]["ssim"])
        entry = {"best_baseline": best, "baseline_ssim": row[best]["ssim"],
                 "ssim": row[method]["ssim"], "beats_baseline_ssim": row[method]["ssim"] > row[best]["ssim"]}
        if "dice_fraction" in row[method]:
            entry["dice_fraction"] = row[method]["dice_fraction"]
            entry["dice_ok"] = row[method]["dice_fraction"] >= 0.9
        out[pair] = entry
    return out


# -- outputs ------------------------------------------------------------------------
def write_grid(path: Path, rows: list[tuple[str, list[torch.Tensor]]], columns: list[str]) -> None:
    """A PNG of image rows (label, [H,W] images in [-1,1]) under ``columns`` headers; atomic."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1][0].shape
    scale, margin, top = max(1, 96 // max(h, w)), 90, 14
    canvas = Image.new("L", (margin + len(columns) * w * scale, top + len(rows) * h * scale), 255)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((margin + c * w * scale + 2, 1), name[:14], fill=0)
    for r, (label, images) in enumerate(rows):
        draw.text((2, top + r * h * scale + h * scale // 2), label[:14], fill=0)
        for c, image in enumerate(images):
            values = ((image.clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
            tile = Image.fromarray(values).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (margin + c * w * scale, top + r * h * scale))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_translation_outputs(run_dir: str | Path, results: Mapping[str, Any],
                              test: Mapping[str, Any], translators: Mapping[str, Translator],
                              examples: int = 4) -> list[Path]:
    """run_dir/translation.json and run_dir/translation/<S>-to-<T>.png (source, each
    method, ground truth per row) for every pair of the results."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "translation.json", dict(results))
    written = [run_dir / "translation.json"]
    for pair in results["pairs"]:
        s, t = pair.split("->")
        x = test[s].images[:examples]
        outputs = {name: fn(x.clone(), s, t) for name, fn in translators.items()}
        rows = [(f"subject {i}", [x[i, 0]] + [outputs[n][i, 0] for n in translators] + [test[t].clean[i, 0]])
                for i in range(x.shape[0])]
        path = run_dir / "translation" / f"{s}-to-{t}.png"
        write_grid(path, rows, [f"source {s}"] + list(translators) + [f"clean {t}"])
        written.append(path)
    return written


def render_section(results: Mapping[str, Any]) -> str:
    """An HTML table (PSNR / SSIM / Dice fraction per pair and method) for evaluation/report.py."""
    methods = results["methods"]
    head = "".join(f"<th>{m}</th>" for m in methods)
    body = []
    for pair, row in results["pairs"].items():
        cells = "".join(
            f"<td>{row[m]['psnr']:.1f} / {row[m]['ssim']:.2f}"
            + (f" / {row[m]['dice_fraction']:.2f}" if "dice_fraction" in row[m] else "") + "</td>"
            for m in methods)
        body.append(f"<tr><td>{pair}</td>{cells}</tr>")
    return (f"<p>PSNR dB / SSIM in the brain box vs the clean target rendering / Dice fraction "
            f"(target-site segmenter), n = {results['n']} held-out test subjects per pair.</p>"
            f"<table><tr><th>pair</th>{head}</tr>{''.join(body)}</table>")
