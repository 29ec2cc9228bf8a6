"""``medgen pretrain-segmenter``: the coordinator trains the bridge's S once, on public data.

S (models/segmenter.py) segments any site's scans because it has only ever seen
random-contrast renderings of public label maps; its quality bounds every translation
number (docs/recipes/translation.md). Training it long is the coordinator's job, done once:
each site pretraining its own copy in round 1 (``options.seg-pretrain-steps``) repeats the
same computation at every hospital and cannot afford tens of thousands of steps.

    medgen pretrain-segmenter --public runs/demo/federation/public --steps 20000 --out S.pt
    medgen-server simulate --set recipe=bridge-translate --set options.seg-init=$PWD/S.pt

Privacy: the inputs are public label maps, random contrasts and random deformations; no
site's data is read, so S costs no privacy and ships in round 1's weights
(``BridgeTranslator.initialise``). ``S.pt.json`` beside it records how it was made.
``--high-contrast F`` renders a fraction F of each batch with unistable's high-contrast
renderer (models/unistable.py; public too, so still free).

An entry point (the command): it reads the public bank with the node's loader, above the
models layer (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medgen.atomic import atomic_torch_save, atomic_write_json
from medgen.data.manifest import load_manifest
from medgen.data.site_data import SiteDataError, load_public_bank
from medgen.models.segmenter import (SegmenterSettings, build_segmenter, fit_segmenter,
                                     train_contrast_agnostic)
from medgen.models.unistable import unistable_batches
from medgen.sim.random_deformation import RandomDeformation


def provenance_path(segmenter_path: str | Path) -> Path:
    """Where the record of how a pretrained S was made lives (``S.pt`` -> ``S.pt.json``)."""
    path = Path(segmenter_path)
    return path.with_name(path.name + ".json")


def pretrain(public_dir: str | Path, out: str | Path, steps: int, image_size: int = 64,
             seed: int = 0, deform: bool = True, lr: float = 3e-3,
             high_contrast: float = 0.0, settings: SegmenterSettings | None = None) -> dict[str, Any]:
    """Train S on renderings of the public bank; write its state dict and provenance
    atomically; return the provenance record. ``high_contrast``: the fraction of each
    batch rendered high-contrast (models/unistable.py); 0 is the plain random-contrast S.
    ``settings``: S's architecture/training (default: ``SegmenterSettings(steps, lr)``)."""
    public = load_public_bank(public_dir, image_size)
    maps = public.label_maps.long()
    classes = _bank_classes(Path(public_dir))
    start = time.perf_counter()
    settings = settings or SegmenterSettings(steps=steps, lr=lr)
    deformation = RandomDeformation() if deform else None
    k = len(classes) if classes else None
    if high_contrast > 0:  # the same seeds as train_contrast_agnostic(seed=seed + 1)
        net = build_segmenter(settings, seed + 1, num_classes=k)
        fit_segmenter(net, unistable_batches(maps, settings.batch_size, high_contrast,
                                             deformation=deformation, num_classes=k), settings, seed + 2)
    else:
        net = train_contrast_agnostic(maps, settings, seed=seed + 1, deformation=deformation, num_classes=k)
    record = {"segmenter": str(out), "steps": settings.steps, "image_size": image_size, "seed": seed,
              "label_names": list(classes) if classes else None,
              "deform": deform, "lr": settings.lr, "high_contrast": high_contrast, "public_maps": int(maps.shape[0]),
              "public_maps_sha256": hashlib.sha256(maps.to(torch.uint8).numpy().tobytes()).hexdigest(),
              "seconds": time.perf_counter() - start}
    atomic_torch_save(out, net.state_dict())
    atomic_write_json(provenance_path(out), record)
    return record


def _bank_classes(public_dir: Path) -> tuple[str, ...] | None:
    """The bank's label schema (its dataset.toml, else the federation root's), as the loader
    reads it; None: no schema declared (the run config's default)."""
    if not public_dir.is_dir():
        return None
    root = public_dir.parent if public_dir.name == "public" else None
    labels = load_manifest(public_dir, root=root).labels
    return tuple(labels.names) if labels is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medgen pretrain-segmenter", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--public", required=True,
                        help="the public bank: a folder of label maps (or one with labels/ inside)")
    parser.add_argument("--out", required=True, help="where to write S's state dict (and OUT.json)")
    parser.add_argument("--steps", type=int, default=20000, help="training steps (default 20000)")
    parser.add_argument("--image-size", type=int, default=64, help="must equal the run's image-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-deform", action="store_true",
                        help="draw the bank's maps as they are (no random deformation)")
    parser.add_argument("--high-contrast", type=float, default=0.0, metavar="F",
                        help="fraction of each batch rendered high-contrast (unistable; default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 0 <= args.high_contrast <= 1:
        parser.error("--high-contrast must be a fraction in [0, 1]")
    try:
        record = pretrain(args.public, args.out, args.steps, args.image_size, args.seed,
                          deform=not args.no_deform, high_contrast=args.high_contrast)
    except SiteDataError as err:
        print(f"medgen pretrain-segmenter: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0
