"""Classical A -> X translation baselines on a built federation (a physics sanity check).

For every held-out test subject the site-A scan is "translated" to site X by
  identity        the A image as is,
  hist-match      histogram matching to the pooled histogram of site X's heldout/fit scans,
  inv-hist-match  the negated A foreground (A > 10 % of its range) matched to X's brain
                  pixels (heldout/fit labels > 0) and A's background to X's background
                  (negating the background would make it the brightest part),
  noisy-X-scan    not a translation: the real X scan itself, the noise floor of the metric,
and scored against the noise-free site-X rendering of the same anatomy (heldout/test/X/
clean) with PSNR and SSIM inside the brain box (medgen.sim.brain_box). Images are scaled to
[0, 1] by their robust range (0.5th-99.5th percentile, as client/site_data does); the clean
target uses the range of its own noisy scan, so target and scan stay comparable.
DATA.md lists the numbers this should land near.

    python -m medgen.sim.baselines DATA_ROOT [--split test]

Needs scikit-image (a test dependency of medgen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medgen.sim.brain_box import brain_box

FOREGROUND = 0.1
METHODS = ("identity", "hist-match", "inv-hist-match", "noisy-X-scan")


def _read(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def robust_range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _scaled(image: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    lo, hi = bounds
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def masked_scores(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) of images in [0, 1], averaged inside ``mask``."""
    from skimage.metrics import structural_similarity

    mse = float(np.mean((prediction[mask] - target[mask]) ** 2))
    psnr = 10.0 * np.log10(1.0 / max(mse, 1e-12))
    _, ssim_map = structural_similarity(prediction, target, data_range=1.0, full=True)
    return psnr, float(ssim_map[mask].mean())


def compute_baselines(root: str | Path, split: str = "test", source: str = "A") -> dict[str, dict[str, tuple[float, float]]]:
    """{target site: {method: (mean PSNR, mean SSIM)}} for source -> every other site."""
    from skimage.exposure import match_histograms

    root = Path(root)
    heldout = root / "heldout" / split
    if not (heldout / source).is_dir():
        raise FileNotFoundError(f"{heldout / source} does not exist: is {root} a built federation "
                                "(python -m medgen.sim.cli build --out DIR)?")
    sites = sorted(p.name for p in heldout.iterdir() if p.is_dir())
    subjects = sorted(p.name for p in (heldout / source / "images").glob("*.nii.gz"))
    sources = {s: _scaled(img, robust_range(img))
               for s in subjects for img in [_read(heldout / source / "images" / s)]}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for target in sites:
        if target == source:
            continue
        fit_dir = root / "heldout" / "fit" / target
        pooled, inside, outside = [], [], []
        for path in sorted((fit_dir / "images").glob("*.nii.gz")):
            x = _read(path)
            x = _scaled(x, robust_range(x))
            box = _read(fit_dir / "labels" / path.name) > 0
            pooled.append(x.ravel())
            inside.append(x[box])
            outside.append(x[~box])
        pooled_all, pooled_in, pooled_out = (np.concatenate(v)[None] for v in (pooled, inside, outside))
        scores: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for s in subjects:
            scan = _read(heldout / target / "images" / s)
            bounds = robust_range(scan)
            clean = _scaled(_read(heldout / target / "clean" / s), bounds)
            mask = brain_box(_read(heldout / target / "labels" / s).astype(np.int64))
            a = sources[s]
            inverted = np.zeros_like(a)
            foreground = a > FOREGROUND
            inverted[foreground] = match_histograms(-a[foreground][None], pooled_in)[0]
            inverted[~foreground] = match_histograms(a[~foreground][None], pooled_out)[0]
            predictions = {"identity": a,
                           "hist-match": match_histograms(a, pooled_all),
                           "inv-hist-match": inverted,
                           "noisy-X-scan": _scaled(scan, bounds)}
            for method, prediction in predictions.items():
                scores[method].append(masked_scores(prediction.astype(np.float64), clean, mask))
        results[target] = {m: tuple(float(v) for v in np.mean(scores[m], axis=0)) for m in METHODS}
    return results


def format_table(results: dict[str, dict[str, tuple[float, float]]], source: str = "A") -> str:
    lines = [f"{source} -> X, PSNR dB / SSIM in the brain box, against the clean X rendering",
             f"{'target':<8}" + "".join(f"{m:>16}" for m in METHODS)]
    for target, row in results.items():
        lines.append(f"{target:<8}" + "".join(f"{row[m][0]:>9.1f} /{row[m][1]:>5.2f}" for m in METHODS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medgen.sim.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="data root written by `medgen.sim.cli build`")
    parser.add_argument("--split", default="test", choices=("fit", "test"))
    parser.add_argument("--source", default="A", help="source site (default A)")
    args = parser.parse_args(argv)
    print(format_table(compute_baselines(args.root, args.split, args.source), args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
