"""A site's images on disk -> validated, normalised tensors, with one item per patient.

``load_site`` is the training side of the one reading of a site folder:
  listing (data/site_folder.py: no link followed, regular files only, unreadable files
  skipped) -> cache key over that listing (data/cache.py) -> on a miss, the records
  (data/site_records.py: every check, labels per record) -> preprocessing
  (data/preprocess.py) -> ``SiteData``.
``medgen-client data check`` (data/data_check.py) runs the same listing and records, so
its verdict is what trains. A bad file is logged, recorded in ``SiteData.skipped`` with a
reason starting with its path relative to the site folder, and skipped; only a site with
nothing usable raises ``SiteDataError``. Nothing on disk is ever written except the
optional cache entry.

The manifest (``dataset.toml`` in the site folder, read over the federation root's when the
folder is ``<root>/sites/<S>``; the brain default without one) decides the modality that is
kept, the intensity map (CT: one fixed HU window at every site; MR: per volume), the label
schema (stored values -> class indices 0..K-1) and whether slices (``dims=2``) or whole
volumes (``dims=3``) are served. The intensity map of every record is kept
(``SiteData.intensity_of(row)``), so a row maps back to physical units exactly.

Labels: with a ``labels/`` folder, each record needs its label map (``need_labels``, the
default, as every current recipe trains on labels); a record without one is skipped alone.
A site with no ``labels/`` folder keeps its images, ``has_labels`` is False and a warning
says so: the dataset then carries all-zero placeholder label maps.

Pairs: a site whose manifest declares ``[paired]`` (data/manifest.py ``PairedModality``:
every patient also has an image of another modality, same file name, in that folder) is
served with ``SiteData.paired``, the second modality's images row for row with ``images``
(read with that modality's own intensity policy, the primary's kept slices), and
``PatientDataset`` items carry it third. A record without its partner, or whose partner
does not match it slice for slice, is skipped with its reason. Not a special case: any
recipe reads ``paired``; one that needs it says so in ``check_site``.

This module also re-exports the public bank, held-out loader, PatientDataset and the
preprocessing functions under their historical import path.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medgen.data.cache import TensorCache, folder_key
from medgen.data.heldout_data import HeldoutSite, load_heldout
from medgen.data.intensity import IntensityMap, intensity_map_from_dict
from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import DatasetManifest, load_manifest
from medgen.data.patient_dataset import PatientDataset
from medgen.data.preprocess import (NORMALISATION_VERSION, ImageScaling, cache_params,
                                      check_image, check_labels, normalise, robust_scaling,
                                      square_resize, volume_scaling)
from medgen.data.public_bank_loader import load_public_bank
from medgen.data.readers import Reader, SkippedFile, default_readers
from medgen.data.site_folder import LINK_REASON, SiteFolder
from medgen.data.site_records import SiteDataError, SiteReading, SiteRecord
from medgen.models.capabilities import CONSUMES

SERVED_DIMS = {"slices": 2, "volumes": 3}
"""What a recipe consumes (``Recipe.consumes``) -> what ``load_site`` serves (``dims``)."""

logger = logging.getLogger(__name__)

__all__ = ["SiteData", "SiteDataError", "SkippedFile", "PatientDataset", "HeldoutSite",
           "load_site", "site_manifest", "federation_root", "load_public_bank", "load_heldout", "NORMALISATION_VERSION",
           "ImageScaling", "check_image", "check_labels", "normalise", "robust_scaling",
           "volume_scaling", "square_resize"]


@dataclass(frozen=True)
class SiteData:
    """A site's usable slices (or volumes). Patients are integers 0..P-1 (no names, no paths).

    ``skipped`` holds the hospital's own file paths and reasons, for its local logs and
    data check only: never put it (or anything derived from a path) into a reply.
    """

    images: torch.Tensor               # [N,1,H,W] (dims 2) or [N,1,D,H,W] (dims 3), in [-1, 1]
    labels: torch.Tensor | None        # [N,H,W] / [N,D,H,W] int64 class indices; None: unlabelled
    patient_index: torch.Tensor        # [N] int64: row -> patient (the privacy unit)
    num_patients: int
    skipped: list[SkippedFile]
    fingerprint: str                   # the cache key (hash of inputs and preprocessing)
    manifest: DatasetManifest = field(default_factory=DatasetManifest.default_brain)
    record_index: torch.Tensor | None = None  # [N] int64: row -> record (its intensity map)
    intensity_maps: tuple[IntensityMap, ...] = ()  # one per record: physical <-> [-1, 1]
    paired: torch.Tensor | None = None  # [N,1,H,W] ([N,1,D,H,W]): manifest.paired's images, row for row
    paired_intensity_maps: tuple[IntensityMap, ...] = ()  # one per record, of the paired images

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def schema(self) -> LabelSchema | None:
        return self.manifest.labels

    @property
    def dims(self) -> int:
        return 3 if self.images.dim() == 5 else 2

    def intensity_of(self, row: int) -> IntensityMap:
        """The map of row ``row``'s record: ``.inverse(images[row])`` is in physical units."""
        return self.intensity_maps[int(self.record_index[row])]

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])


@dataclass
class _Tensors:
    patient_key: str
    key: str
    images: torch.Tensor          # [S,1,H,W] or [1,1,D,H,W]
    labels: torch.Tensor | None   # [S,H,W] or [1,D,H,W]
    intensity: IntensityMap
    paired: "_Tensors | None" = None  # the record's partner in manifest.paired's folder


def federation_root(site_dir: str | Path) -> Path | None:
    """``<root>`` when ``site_dir`` is ``<root>/sites/<S>`` (its dataset.toml applies), else None."""
    site_dir = Path(site_dir)
    parent = site_dir.absolute().parent
    return parent.parent if parent.name == "sites" else None


def site_manifest(site_dir: str | Path, root: str | Path | None = None) -> DatasetManifest:
    """The manifest a site is read with: its dataset.toml over the federation root's."""
    return load_manifest(site_dir, root=root if root is not None else federation_root(site_dir))


def load_site(site_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
              readers: Sequence[Reader] | None = None, need_labels: bool = True, *,
              root: str | Path | None = None, manifest: DatasetManifest | None = None,
              dims: int | None = None, depth: int | None = None,
              consumes: str | None = None) -> SiteData:
    """Read, validate and preprocess a site directory (docs/data-layout.md); see module doc.

    ``cache_dir``: reuse tensors made from byte-identical inputs and parameters.
    ``readers``: reader instances to use instead of the registry's (tests, options).
    ``need_labels``: skip a record without a label map when the site has labels/.
    ``root``: the federation root whose dataset.toml the site's is read over (default: the
    folder above ``sites/`` when the site sits there); ``manifest``: use this one instead.
    ``dims``: 2 serves axial slices, 3 one volume per record ([1, D, size, size], D =
    ``depth``, default ``image_size``, resampled through-plane); default: the manifest's.
    ``consumes``: what the recipe that trains on it declares ("slices" or "volumes",
    ``Recipe.consumes``), which decides ``dims`` (a volume site serves a slice recipe its
    axial slices; a record of one slice cannot be a volume and is skipped with its reason).
    """
    site_dir = Path(site_dir)
    manifest = manifest if manifest is not None else site_manifest(site_dir, root)
    if consumes is not None:
        if consumes not in CONSUMES or (dims is not None and dims != SERVED_DIMS[consumes]):
            raise ValueError(f"consumes = {consumes!r} with dims = {dims}: consumes is one of "
                             f"{CONSUMES} and decides dims ({SERVED_DIMS})")
        dims = SERVED_DIMS[consumes]
    dims = int(dims if dims is not None else manifest.dims)
    if dims not in (2, 3):
        raise ValueError(f"dims = {dims}: serve 2 (slices) or 3 (volumes)")
    depth = int(depth if depth is not None else image_size) if dims == 3 else None
    readers = list(readers) if readers is not None else default_readers()
    pair_folders = (manifest.paired.folder,) if manifest.paired is not None else ()
    folder = SiteFolder.scan(site_dir, ("images", "labels") + pair_folders)
    if "images" not in folder.present:
        linked = any(rel == "images" and reason == LINK_REASON for rel, reason in folder.skipped)
        why = ("images/ is a symbolic link, and medgen follows no link in a site folder: point "
               "the node at a folder whose images/ is a real folder" if linked else
               "no images/ folder; a site directory holds images/ and optionally labels/")
        raise SiteDataError(f"{site_dir}: {why} (docs/data-layout.md)")
    key = folder_key(folder, cache_params(image_size, readers, "site", need_labels=need_labels,
                                          manifest=manifest.to_tables(), dims=dims, depth=depth))
    cache = TensorCache(cache_dir, prefix="site") if cache_dir is not None else None
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        skipped = [SkippedFile(site_dir / rel, reason) for rel, reason in cached["skipped"]]
        for item in skipped:
            logger.warning("skipped %s (cached result)", item.reason)
        site = SiteData(cached["images"], cached["labels"], cached["patient_index"],
                        int(cached["num_patients"]), skipped, key, manifest,
                        cached["record_index"],
                        tuple(intensity_map_from_dict(m) for m in cached["intensity_maps"]),
                        cached.get("paired"),
                        tuple(intensity_map_from_dict(m) for m in cached.get("paired_maps", ())))
        _warn_if_unlabelled(site_dir, site)
        return site
    reading = SiteReading(folder, readers, need_labels=need_labels, manifest=manifest)
    servable = _servable(reading, depth)
    if manifest.paired is not None:
        records = _with_partners(reading, servable, readers, image_size, depth)
    else:
        records = [_tensors(record, image_size, depth) for record in servable]
    if not records:
        reasons = "\n  ".join(s.reason for s in reading.skipped) or "images/ holds no files"
        raise SiteDataError(f"{site_dir}: no usable images; reasons:\n  {reasons}")
    site = _assemble(records, reading.skipped, key, manifest)
    _warn_if_unlabelled(site_dir, site)
    if cache is not None:
        cache.put(key, {"images": site.images, "labels": site.labels,
                        "patient_index": site.patient_index, "num_patients": site.num_patients,
                        "record_index": site.record_index,
                        "intensity_maps": [m.to_dict() for m in site.intensity_maps],
                        "paired": site.paired,
                        "paired_maps": [m.to_dict() for m in site.paired_intensity_maps],
                        "skipped": [[reading.skips.relative(s.path), s.reason]
                                    for s in site.skipped]})
    return site


def _servable(reading: SiteReading, depth: int | None) -> list[SiteRecord]:
    """The records that can be served: as volumes (``depth`` set) only those of >= 2 slices;
    a 2D image stretched through-plane would be a fake volume, so it is skipped by name."""
    records = reading.records()
    if depth is None:
        return records
    kept = []
    for record in records:
        if int(record.volume.array.shape[-1]) >= 2:
            kept.append(record)
        else:
            reading.skips.add(reading.folder.root / record.source,
                              "a single 2D slice: volumes are served (dims = 3, a recipe that "
                              "consumes volumes), and a volume needs at least 2 slices")
    return kept


def _with_partners(reading: SiteReading, records: list[SiteRecord], readers: Sequence[Reader],
                   size: int, depth: int | None) -> list[_Tensors]:
    """Each record with its partner of ``[paired] folder`` (same name); a record without a
    usable partner, or one of another slice count, is skipped with the reason."""
    paired = reading.manifest.paired
    second = SiteReading(reading.folder, readers, images=paired.folder, need_labels=False,
                         manifest=paired.manifest(reading.manifest))
    partners = {r.key: r for r in _servable(second, depth)}
    for item in second.skipped:
        reading.skips.add(item.path, item.reason)
    kept = []
    for primary in records:
        partner = partners.get(primary.key)
        if partner is None or partner.volume.array.shape != primary.volume.array.shape:
            why = (f"no usable {paired.modality} partner in {paired.folder}/ (same name)"
                   if partner is None else f"its {paired.modality} partner in {paired.folder}/ has "
                   f"shape {partner.volume.array.shape}, the image {primary.volume.array.shape}")
            reading.skips.add(reading.folder.root / primary.source, f"{why}: the site's manifest "
                              "declares [paired], so each record is served with its partner")
            continue
        keep = primary.scaling.keep if depth is None else np.ones_like(partner.scaling.keep)
        scaling = ImageScaling(keep, partner.scaling.low, partner.scaling.high, partner.scaling.intensity)
        record = _tensors(primary, size, depth)
        record.paired = _tensors(dataclasses.replace(partner, scaling=scaling, labels=None), size, depth)
        kept.append(record)
    return kept


def _tensors(record: SiteRecord, size: int, depth: int | None) -> _Tensors:
    volume, scaling = record.volume, record.scaling
    if depth is not None:  # a volume: every slice kept (a blank end slice is anatomy too)
        scaling = ImageScaling(np.ones_like(scaling.keep), scaling.low, scaling.high,
                               scaling.intensity)
    images = square_resize(normalise(volume.array, scaling), size, volume.spacing, "image")
    labels = None
    if record.labels is not None:
        labels = square_resize(record.labels[..., scaling.keep], size, volume.spacing, "label")
    if depth is None:
        return _Tensors(record.patient_key, record.key, images.unsqueeze(1), labels,
                        scaling.intensity)
    # [S, size, size] -> [1, 1, depth, size, size]: through-plane to a fixed depth
    images = F.interpolate(images[None, None], size=(depth, size, size), mode="trilinear",
                           align_corners=False).clamp_(-1.0, 1.0)
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=(depth, size, size),
                               mode="nearest-exact")[:, 0].round().to(torch.int64)
    return _Tensors(record.patient_key, record.key, images, labels, scaling.intensity)


def _assemble(records: list[_Tensors], skipped: list[SkippedFile], key: str,
              manifest: DatasetManifest) -> SiteData:
    # patients numbered by their first record's name (not by patient_key, which may be a
    # per-process salted hash): the same files give the same order in every run
    records.sort(key=lambda r: r.key)
    patients: dict[str, int] = {}
    for record in records:
        patients.setdefault(record.patient_key, len(patients))
    records.sort(key=lambda r: patients[r.patient_key])  # stable: a patient's slices contiguous
    missing = sum(r.labels is None for r in records)
    if missing and missing < len(records):
        # only without labels/ (or need_labels=False): per-record skipping keeps the rest
        logger.warning("%d of %d images have no label map; this site's labels are not used "
                       "(add labels/ to skip only the unlabelled records)", missing, len(records))
    labels = None if missing else torch.cat([r.labels for r in records])
    patient_index = torch.cat([torch.full((r.images.shape[0],), patients[r.patient_key],
                                          dtype=torch.int64) for r in records])
    images = torch.cat([r.images for r in records]).contiguous()
    record_index = torch.cat([torch.full((r.images.shape[0],), k, dtype=torch.int64)
                              for k, r in enumerate(records)])
    pairs = [r.paired for r in records if r.paired is not None]
    paired = torch.cat([p.images for p in pairs]).contiguous() if pairs else None
    return SiteData(images, labels, patient_index, len(patients), skipped, key, manifest,
                    record_index, tuple(r.intensity for r in records), paired,
                    tuple(p.intensity for p in pairs))


def _warn_if_unlabelled(site_dir: Path, site: SiteData) -> None:
    if not site.has_labels:
        logger.warning("%s: no label maps are used at this site (no labels/ folder, or not "
                       "every image has one): has_labels is False and the dataset carries "
                       "all-zero placeholder label maps; recipes that need labels refuse it",
                       site_dir.name)
