"""Build the simulated federation on disk (the layout of docs/data-layout.md).

    <out>/manifest.json
    <out>/sites/<site>/images|labels/<subject>.nii.gz      disjoint subjects per site
                                  (a site in ``dicom_sites``: images/<subject>/ DICOM series)
    <out>/public/labels/<id>.nii.gz                        public anatomy bank (labels only)
    <out>/heldout/{fit,test}/<site>/images|labels|clean/   same subjects at every site

The build is deterministic (same config -> byte-identical files: gzip without a timestamp,
NIfTI headers without dates), idempotent (an existing build with the same config hash is
returned as is), and atomic (everything is written into a sibling temp folder that is
renamed into place at the end, so a crash never leaves a half-built data root).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medgen.atomic import atomic_write_json
from medgen.data.staging import staged_folder
from medgen.sim.anatomy import FOV_MM, load_anatomy
from medgen.sim.config import GENERATOR_VERSION, SimConfig, deformation_seed, scan_seed
from medgen.sim.physics import render_clean, render_scan, scanner_units
from medgen.sim.lesions import write_lesion_schema
from medgen.sim.subjects import Subject, deform_subject, render_grid

MANIFEST = "manifest.json"


class FederationExistsError(FileExistsError):
    """The output folder holds something else than this exact build."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def config(self) -> SimConfig:
        return SimConfig.from_dict(self.data["config"])

    @property
    def config_hash(self) -> str:
        return self.data["config_hash"]

    @property
    def content_hash(self) -> str:
        return self.data["content_hash"]

    @property
    def site_names(self) -> tuple[str, ...]:
        """In the build's site order (a site's index): manifest.json sorts its keys, which
        puts AA before B once there are more than 26 sites."""
        return self.config.site_names

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    @property
    def heldout_dir(self) -> Path:
        return self.root / "heldout"

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        try:
            return cls(root=root, data=json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist: build the federation first "
                                    "(python -m medgen.sim.cli build --out DIR)") from None


def build_federation(config: SimConfig, out_dir: str | Path, overwrite: bool = False,
                     workers: int = 1,
                     progress: Callable[[str], None] | None = None) -> Manifest:
    """Render and write the whole federation; return its manifest (see module docstring).

    ``workers`` > 1 renders in that many spawned processes (the files do not depend on it).
    """
    out = Path(out_dir)
    existing = out / MANIFEST
    if existing.is_file():
        manifest = Manifest.load(out)
        if manifest.config_hash == config.config_hash():
            return manifest
        if not overwrite:
            raise FederationExistsError(
                f"{out} holds a federation built from a different config "
                f"(seed {manifest.data['config'].get('seed')}, sites "
                f"{manifest.data['config'].get('sites')}); pass overwrite=True "
                "(--overwrite) to replace it, or choose another --out folder")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FederationExistsError(f"{out} exists, is not empty and has no {MANIFEST}; "
                                    "refusing to write into it (choose an empty or new folder)")

    with staged_folder(out) as staging:
        data = _render_all(config, staging, workers, progress or (lambda message: None))
        _write_dicom_sites(config, staging)
        if config.lesion_spec() is not None:  # the label schema gains the lesion class
            write_lesion_schema(config, staging)
        data["content_hash"] = content_hash(staging)
        atomic_write_json(staging / MANIFEST, data)
    return Manifest.load(out)


@dataclass(frozen=True)
class RenderTask:
    """One subject to render: where it goes and at which sites (pure data, picklable)."""

    group: str  # "sites/A", "public", "heldout/fit", "heldout/test"
    index: int  # global subject index (seeds derive from it)
    subject: Subject
    sites: tuple[str, ...]  # sites to render it at (empty: labels only)


def plan_tasks(config: SimConfig) -> list[RenderTask]:
    """Every subject of the build in global index order; seeds are disjoint by index."""
    names, counts = config.site_names, config.site_counts()
    groups = [(f"sites/{n}", f"{n}-", counts[n], (n,)) for n in names]
    groups += [("public", "pub-", config.public_size, ()),
               ("heldout/fit", "hf-", config.heldout_fit, names),
               ("heldout/test", "ht-", config.heldout_test, names)]
    tasks, seen = [], set()
    for group, prefix, count, sites in groups:
        for number in range(count):
            index = len(tasks)
            seed = deformation_seed(config.seed, index)
            if seed in seen:  # 63-bit hashes: practically impossible, checked anyway
                raise RuntimeError(f"deformation seed collision at subject {index}; change the seed")
            seen.add(seed)
            tasks.append(RenderTask(group, index, Subject(f"{prefix}{number:04d}", seed), sites))
    return tasks


def render_tasks(config: SimConfig, root: str, tasks: list[RenderTask]) -> dict[int, int]:
    """Render and write ``tasks`` under ``root``; returns {subject index: axial level}.

    Runs in a worker process (or inline): it loads the anatomy itself, so nothing large
    is pickled and no process-global state is needed.
    """
    import torch

    torch.set_num_threads(1)
    size = config.image_size
    anatomy = load_anatomy(render_grid(size, FOV_MM))
    physics = config.physics()
    site_index = {name: i for i, name in enumerate(config.site_names)}
    pixel_out = FOV_MM / size
    levels = {}
    for task in tasks:
        sid = task.subject.subject_id
        anat = deform_subject(anatomy, task.subject.deformation_seed, size, config.lesion_spec())
        levels[task.index] = anat.level
        if task.group == "public":
            write_nifti(Path(root, "public", "labels", f"{sid}.nii.gz"), anat.labels, pixel_out)
            continue
        for site in task.sites:
            base = Path(root, task.group) if task.group.startswith("sites/") \
                else Path(root, task.group, site)
            scan = render_scan(anat.maps, physics[site], anatomy.tissue_t1, anatomy.pixel_mm,
                               size, scan_seed(config.seed, task.index, site_index[site]))
            write_nifti(base / "images" / f"{sid}.nii.gz", scan, pixel_out)
            write_nifti(base / "labels" / f"{sid}.nii.gz", anat.labels, pixel_out)
            if task.group.startswith("heldout/"):
                clean = scanner_units(render_clean(anat.maps, physics[site], anatomy.tissue_t1,
                                                   anatomy.pixel_mm, size), physics[site].bits)
                write_nifti(base / "clean" / f"{sid}.nii.gz", clean, pixel_out)
    return levels


def _render_all(config: SimConfig, root: Path, workers: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    tasks = plan_tasks(config)
    levels: dict[int, int] = {}
    if workers <= 1:
        levels = render_tasks(config, str(root), tasks)
    else:
        # round-robin chunks: every worker gets a similar mix of cheap and costly tasks
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        chunks = [tasks[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for done in pool.map(render_tasks, [config] * workers, [str(root)] * workers, chunks):
                levels.update(done)
    progress(f"rendered {len(tasks)} subjects with {workers} worker(s) in "
             f"{time.perf_counter() - start:.1f} s")

    physics = config.physics()
    names = config.site_names
    subjects: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        subjects.setdefault(task.group, []).append(
            _record(task.subject, levels[task.index], task.index))
    return {
        "generator": GENERATOR_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "sites": {name: physics[name].to_dict() for name in names},
        "site_formats": {name: "dicom" if name in config.dicom_sites else "nifti" for name in names},
        "counts": {group: len(records) for group, records in subjects.items()},
        "image_size": config.image_size,
        "pixel_mm": FOV_MM / config.image_size,
        "fov_mm": FOV_MM,
        "anatomy": "MNI ICBM152 2009a symmetric (Fonov et al. 2009, 2011), via nilearn",
        "subjects": subjects,
    }


def _write_dicom_sites(config: SimConfig, root: Path) -> None:
    """Replace each of ``config.dicom_sites``' NIfTI images by DICOM series, in place.

    ``sites/<site>/images/<subject>/`` becomes one DICOM MR series per subject (stored values
    as in the NIfTI, medgen.sim.dicom_export); labels stay NIfTI. No NIfTI image is left in
    the site's folder, so its client reads DICOM like a hospital export. UIDs derive from the
    build seed and the site's index: deterministic, distinct across sites.
    """
    from medgen.sim.dicom_export import export_site_as_dicom

    for site in config.dicom_sites:
        site_dir = root / "sites" / site
        exported = root / "sites" / f".{site}.dicom"
        seed = int(np.random.SeedSequence([config.seed, 2, config.site_names.index(site)])
                   .generate_state(1, np.uint32)[0] >> 1)
        export_site_as_dicom(site_dir, exported, seed=seed)
        shutil.rmtree(site_dir)
        os.replace(exported, site_dir)


def _record(subject: Subject, level: int, index: int) -> dict[str, Any]:
    return {"id": subject.subject_id, "deformation_seed": subject.deformation_seed,
            "level": int(level), "index": index}


def write_nifti(path: Path, array: np.ndarray, pixel_mm: float) -> None:
    """Write a 2D NIfTI deterministically (no timestamp in the gzip header)."""
    import nibabel as nib

    affine = np.diag([pixel_mm, pixel_mm, 1.0, 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def content_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes (manifest excluded), sorted."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()

