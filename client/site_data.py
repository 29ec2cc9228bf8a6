"""A site's images on disk -> validated, normalised tensors, with one item per patient.

``load_site`` walks ``<site>/images`` (and ``labels/``), reads every record with the
reader that claims it (client/readers.py), validates it, normalises and resizes it, and
returns a ``SiteData``. A bad file is logged, recorded in ``SiteData.skipped`` with a
reason naming it, and skipped; only a site with nothing usable raises ``SiteDataError``.
Nothing on disk is ever written except the optional cache entry (client/cache.py).

Preprocessing (shared by sites, the public bank and held-out data, so every "[-1, 1]"
means the same thing; NORMALISATION_VERSION is in every cache key):
- per axial slice, the 0.5th..99.5th percentile range maps to [-1, 1], clipped (robust
  to hot pixels and to a site's bit depth); a slice with an empty robust range falls
  back to min..max; a constant slice (a blank end slice of a volume) is dropped;
- each slice is padded to a square in PHYSICAL extent (in-plane spacing when known, so
  anisotropic pixels do not stretch anatomy) with -1 (images) or 0 (labels), then
  resized to size x size: area averaging when shrinking, bilinear when enlarging,
  nearest neighbour for labels.
Arrays are used in stored voxel order; the third axis is the slice axis (data contract).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from medgen import TISSUE_CLASSES
from medgen.client.cache import TensorCache, fingerprint
from medgen.client.readers import (Reader, ReaderError, SkippedFile, Volume, default_readers,
                                   find_reader)
from medgen.models.recipe import PublicData

logger = logging.getLogger(__name__)

__all__ = ["SiteData", "SiteDataError", "SkippedFile", "PatientDataset", "HeldoutSite",
           "load_site", "load_public_bank", "load_heldout", "NORMALISATION_VERSION"]


class SiteDataError(ValueError):
    """Nothing usable was found; the message names the directory and every reason."""


@dataclass(frozen=True)
class ImageScaling:
    """The per-slice mapping used for one image (reused for its clean twin)."""

    keep: np.ndarray  # [S] bool: slices kept (not constant)
    low: np.ndarray   # [S] float: value mapped to -1
    high: np.ndarray  # [S] float: value mapped to +1


# ---------------------------------------------------------------------------------------
# preprocessing of one record
# ---------------------------------------------------------------------------------------
NORMALISATION_VERSION = 1
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def check_image(array: np.ndarray) -> None:
    """Raise ReaderError saying why the voxels cannot be used as an image."""
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ReaderError(f"contains {bad} non-finite voxels (NaN or inf)")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise ReaderError(f"is constant (every voxel = {low:g}); nothing to learn from it")


def robust_scaling(array: np.ndarray) -> ImageScaling:
    """Per-slice 0.5..99.5 percentile range of a (H, W, S) image."""
    check_image(array)
    low, high = np.percentile(array, [LOW_PERCENTILE, HIGH_PERCENTILE], axis=(0, 1))
    narrow = high <= low
    low = np.where(narrow, array.min(axis=(0, 1)), low)
    high = np.where(narrow, array.max(axis=(0, 1)), high)
    keep = high > low
    if not keep.any():
        raise ReaderError(f"every slice is constant; nothing to learn from it")
    return ImageScaling(keep=keep, low=low.astype(np.float64), high=high.astype(np.float64))


def normalise(array: np.ndarray, scaling: ImageScaling) -> np.ndarray:
    """Kept slices of ``array`` mapped to [-1, 1] by ``scaling`` and clipped."""
    kept = array[..., scaling.keep].astype(np.float64)
    low, high = scaling.low[scaling.keep], scaling.high[scaling.keep]
    scaled = 2.0 * (kept - low) / (high - low) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def check_labels(labels: np.ndarray, image_shape: tuple[int, ...] | None, label_name: str) -> None:
    """Raise ReaderError naming the label file if it is not a tissue map (for the image)."""
    labels = np.asarray(labels)
    if image_shape is not None and tuple(labels.shape) != tuple(image_shape):
        raise ReaderError(f"label map {label_name} has shape {tuple(labels.shape)} but the image "
                          f"has shape {tuple(image_shape)}; they must match voxel for voxel")
    if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
        raise ReaderError(f"label map {label_name} has non-integer values; expected integers "
                          f"0..{len(TISSUE_CLASSES) - 1}")
    outside = np.unique(labels[(labels < 0) | (labels >= len(TISSUE_CLASSES))])
    if outside.size:
        shown = ", ".join(f"{v:g}" for v in outside[:5])
        raise ReaderError(f"label map {label_name} has values outside 0..{len(TISSUE_CLASSES) - 1} "
                          f"({shown}); expected {', '.join(f'{i} {c}' for i, c in enumerate(TISSUE_CLASSES))}")


def square_resize(slices: np.ndarray, size: int, spacing: tuple[float, float, float] | None,
                  kind: str) -> torch.Tensor:
    """(H, W, S) -> [S, size, size]; ``kind`` is "image" (float32) or "label" (int64)."""
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(slices, -1, 0)))
    tensor = tensor.to(torch.float32).unsqueeze(1)  # [S, 1, H, W]
    height, width = tensor.shape[-2:]
    row_mm, col_mm = (spacing[0], spacing[1]) if spacing and min(spacing[:2]) > 0 else (1.0, 1.0)
    side_mm = max(height * row_mm, width * col_mm)
    target_h, target_w = max(height, round(side_mm / row_mm)), max(width, round(side_mm / col_mm))
    top, left = (target_h - height) // 2, (target_w - width) // 2
    fill = -1.0 if kind == "image" else 0.0
    tensor = F.pad(tensor, (left, target_w - width - left, top, target_h - height - top),
                   value=fill)
    if kind == "label":
        out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
        return out[:, 0].round().to(torch.int64)
    if min(target_h, target_w) >= size:
        out = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    return out[:, 0].clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------
# walking a folder
# ---------------------------------------------------------------------------------------
def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _item_key(path: Path, base: Path) -> str:
    """Subject name: the path under ``base`` without its file suffix (x.nii.gz -> x)."""
    relative = _relative(path, base)
    if path.is_dir():
        return relative
    if relative.lower().endswith(".nii.gz"):
        return relative[:-7]
    suffix = Path(relative).suffix
    return relative[: -len(suffix)] if suffix else relative


def _skip(skipped: list[SkippedFile], path: Path, reason: str) -> None:
    logger.warning("skipped %s", reason)
    skipped.append(SkippedFile(path, reason))


def _scan(folder: Path, readers: Sequence[Reader], root: Path,
          skipped: list[SkippedFile]) -> list[tuple[Path, Reader]]:
    """Claimed (path, reader) pairs under ``folder``; unclaimed folders are walked into."""
    found: list[tuple[Path, Reader]] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        _skip(skipped, folder, f"{_relative(folder, root)}: folder cannot be listed ({err.strerror})")
        return found
    for entry in entries:
        if entry.name.startswith("."):  # .DS_Store, editor swap files
            continue
        reader = find_reader(entry, readers)
        if reader is not None:
            found.append((entry, reader))
        elif entry.is_dir():
            found.extend(_scan(entry, readers, root, skipped))
        else:
            names = ", ".join(r.name for r in readers)
            _skip(skipped, entry, f"{_relative(entry, root)}: no reader for this file type "
                                  f"(readers: {names})")
    return found


def _keyed(folder: Path, readers: Sequence[Reader], root: Path,
           skipped: list[SkippedFile]) -> dict[str, tuple[Path, Reader]]:
    items: dict[str, tuple[Path, Reader]] = {}
    if not folder.is_dir():
        return items
    for path, reader in _scan(folder, readers, root, skipped):
        key = _item_key(path, folder)
        if key in items:
            _skip(skipped, path, f"{_relative(path, root)}: same name as "
                                 f"{_relative(items[key][0], root)}; one file per subject")
        else:
            items[key] = (path, reader)
    return items


def _read_outcomes(path: Path, reader: Reader, root: Path,
                   skipped: list[SkippedFile]) -> list[Volume]:
    """Every volume ``reader`` finds at ``path``; failures are recorded, never raised."""
    try:
        result = reader.read(path)
        outcomes = [result] if isinstance(result, Volume) else list(result)
    except ReaderError as err:
        _skip(skipped, path, f"{_relative(path, root)}: {err}")
        return []
    except Exception as err:  # a reader bug must not take the whole site down
        _skip(skipped, path, f"{_relative(path, root)}: reader '{reader.name}' failed "
                             f"({type(err).__name__}: {err})")
        return []
    volumes = []
    for outcome in outcomes:
        if isinstance(outcome, SkippedFile):
            _skip(skipped, outcome.path, outcome.reason)
        else:
            volumes.append(outcome)
    return volumes


def _read_single(path: Path, reader: Reader, root: Path) -> Volume:
    """Exactly one volume, or ReaderError naming ``path``."""
    name = _relative(path, root)
    try:
        result = reader.read(path)
        volumes = [result] if isinstance(result, Volume) else [
            v for v in result if isinstance(v, Volume)]
    except ReaderError as err:
        raise ReaderError(f"{name}: {err}") from None
    except Exception as err:
        raise ReaderError(f"{name}: reader '{reader.name}' failed ({type(err).__name__}: {err})") from None
    if len(volumes) != 1:
        raise ReaderError(f"{name}: holds {len(volumes)} volumes; expected exactly one")
    return volumes[0]


# ---------------------------------------------------------------------------------------
# a site
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteData:
    """A site's usable slices. Patients are integers 0..P-1 (no names, no paths).

    ``skipped`` holds the hospital's own file paths and reasons, for its local logs and
    data check only: never put it (or anything derived from a path) into a reply.
    """

    images: torch.Tensor               # [N,1,H,W] float32 in [-1, 1]
    labels: torch.Tensor | None        # [N,H,W] int64 in 0..3, None unless every image has one
    patient_index: torch.Tensor        # [N] int64: slice -> patient (the privacy unit)
    num_patients: int
    skipped: list[SkippedFile]
    fingerprint: str                   # the cache key (hash of inputs and preprocessing)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])


@dataclass
class _Record:
    patient_key: str
    key: str
    images: torch.Tensor
    labels: torch.Tensor | None


def _site_params(image_size: int, readers: Sequence[Reader], kind: str) -> dict:
    return {"kind": kind, "image_size": int(image_size), "normalisation": NORMALISATION_VERSION,
            "percentiles": [LOW_PERCENTILE, HIGH_PERCENTILE], "readers": [getattr(r, "cache_token", r.name) for r in readers]}


def load_site(site_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
              readers: Sequence[Reader] | None = None) -> SiteData:
    """Read, validate and preprocess a site directory (docs/data-layout.md); see module doc.

    ``cache_dir``: reuse tensors made from byte-identical inputs and parameters.
    ``readers``: reader instances to use instead of the registry's (tests, options).
    """
    site_dir = Path(site_dir)
    if not (site_dir / "images").is_dir():
        raise SiteDataError(f"{site_dir}: no images/ folder; a site directory holds images/ and "
                            "optionally labels/ (docs/data-layout.md)")
    readers = list(readers) if readers is not None else default_readers()
    key = fingerprint(site_dir, ("images", "labels"), _site_params(image_size, readers, "site"))
    cache = TensorCache(cache_dir, prefix="site") if cache_dir is not None else None
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        skipped = [SkippedFile(site_dir / rel, reason) for rel, reason in cached["skipped"]]
        for item in skipped:
            logger.warning("skipped %s (cached result)", item.reason)
        return SiteData(cached["images"], cached["labels"], cached["patient_index"],
                        int(cached["num_patients"]), skipped, key)
    site = _build_site(site_dir, image_size, readers, key)
    if cache is not None:
        cache.put(key, {"images": site.images, "labels": site.labels,
                        "patient_index": site.patient_index, "num_patients": site.num_patients,
                        "skipped": [[_relative(s.path, site_dir), s.reason] for s in site.skipped]})
    return site


def _build_site(site_dir: Path, size: int, readers: Sequence[Reader], key: str) -> SiteData:
    images_dir = site_dir / "images"
    skipped: list[SkippedFile] = []
    labels = _keyed(site_dir / "labels", readers, site_dir, skipped)
    records: list[_Record] = []
    seen: dict[str, str] = {}
    for path, reader in _scan(images_dir, readers, site_dir, skipped):
        this_read: set[str] = set()
        for number, volume in enumerate(_read_outcomes(path, reader, site_dir, skipped)):
            # a reader reporting several volumes names each by its own source under images/;
            # several series in one folder share it, so they are numbered
            source = volume.source if volume.source.is_relative_to(images_dir) else path
            item = _item_key(source, images_dir)
            item = f"{item}#{number}" if item in this_read else item
            this_read.add(item)
            name = _relative(source, site_dir)
            if item in seen:
                _skip(skipped, source, f"{name}: same name as {seen[item]}; one file per subject")
                continue
            seen[item] = name
            try:
                records.append(_site_record(volume, item, labels.get(item), size, site_dir))
            except ReaderError as err:
                _skip(skipped, source, f"{name}: {err}")
    for item in sorted(set(labels) - set(seen)):
        _skip(skipped, labels[item][0], f"{_relative(labels[item][0], site_dir)}: label map "
                                        "with no image of the same name in images/")
    if not records:
        reasons = "\n  ".join(s.reason for s in skipped) or "images/ holds no files"
        raise SiteDataError(f"{site_dir}: no usable images; reasons:\n  {reasons}")
    return _assemble(records, skipped, key)


def _site_record(volume: Volume, item: str, label: tuple[Path, Reader] | None, size: int,
                 site_dir: Path) -> _Record:
    scaling = robust_scaling(volume.array)
    images = square_resize(normalise(volume.array, scaling), size, volume.spacing, "image")
    label_map = None
    if label is not None:
        label_array = _read_single(label[0], label[1], site_dir).array
        label_name = _relative(label[0], site_dir)
    elif volume.meta.get("labels") is not None:  # e.g. a DICOM SEG read with its series
        label_array = np.asarray(volume.meta["labels"], dtype=np.float32)
        label_name = f"(segmentation read with {item})"
    if label is not None or volume.meta.get("labels") is not None:
        check_labels(label_array, volume.array.shape, label_name)
        label_map = square_resize(label_array[..., scaling.keep], size, volume.spacing, "label")
    patient_key = str(volume.meta.get("patient_key", item))
    return _Record(patient_key, item, images.unsqueeze(1), label_map)


def _assemble(records: list[_Record], skipped: list[SkippedFile], key: str) -> SiteData:
    # patients numbered by their first record's name (not by patient_key, which may be a
    # per-process salted hash): the same files give the same order in every run
    records.sort(key=lambda r: r.key)
    patients: dict[str, int] = {}
    for record in records:
        patients.setdefault(record.patient_key, len(patients))
    records.sort(key=lambda r: patients[r.patient_key])  # stable: a patient's slices contiguous
    missing = sum(r.labels is None for r in records)
    if missing:
        logger.warning("%d of %d images have no label map in labels/; this site's labels are "
                       "not used", missing, len(records))
    labels = None if missing else torch.cat([r.labels for r in records])
    patient_index = torch.cat([torch.full((r.images.shape[0],), patients[r.patient_key],
                                          dtype=torch.int64) for r in records])
    images = torch.cat([r.images for r in records]).contiguous()
    return SiteData(images, labels, patient_index, len(patients), skipped, key)


# ---------------------------------------------------------------------------------------
# one item = one patient
# ---------------------------------------------------------------------------------------
class PatientDataset(Dataset):
    """Dataset whose item is ONE PATIENT: one of the patient's slices, drawn at random.

    Why patient-level DP stays exact: Opacus treats a dataset item as a record. Here the
    items are patients, so Poisson sampling includes each PATIENT independently with
    probability q = batch_size / num_patients (what DPDataLoader computes from
    len(dataset) = num_patients), and a sampled patient contributes exactly one example,
    hence one per-sample gradient clipped to C. Adding or removing a patient adds or
    removes one item and changes the noisy sum by at most C: the (epsilon, delta) the
    accountant reports is per patient, whatever the number of slices. Which slice is used
    is chosen by this dataset's own seeded generator, independent of the data, so it is
    part of the randomised mechanism, not a leak. (Items as slices would instead let one
    patient enter a batch many times and weaken the guarantee by up to the slice count.)

    Items are (image [1,H,W] float32, label [H,W] int64). A site without labels returns
    an all-zero label map; check ``has_labels`` before using it. Always returning a tensor
    keeps DPDataLoader's empty Poisson batches well-formed ([0,1,H,W] and [0,H,W]).
    Pass a ``generator_seed`` that changes every round (e.g. from run seed, round, site),
    so rounds draw different slices; DataLoader workers each derive their own stream.
    """

    def __init__(self, site_data: SiteData, generator_seed: int):
        self.images = site_data.images
        self.labels = site_data.labels
        self.has_labels = site_data.has_labels
        self.num_patients = site_data.num_patients
        index = site_data.patient_index
        self._counts = torch.bincount(index, minlength=self.num_patients)
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        self._order = torch.argsort(index, stable=True)
        self._seed = int(generator_seed)
        self._generator = torch.Generator().manual_seed(self._seed)
        self._worker_seed: int | None = None
        self._worker_generator: torch.Generator | None = None

    def __len__(self) -> int:
        return self.num_patients

    def __getitem__(self, patient: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_patients <= patient < self.num_patients:
            raise IndexError(f"patient {patient} out of range (site has {self.num_patients})")
        patient = patient % self.num_patients
        count = int(self._counts[patient])
        offset = int(torch.randint(count, (1,), generator=self._rng())) if count > 1 else 0
        row = int(self._order[int(self._starts[patient]) + offset])
        image = self.images[row].clone()
        if self.labels is not None:
            return image, self.labels[row].clone()
        return image, torch.zeros(image.shape[-2:], dtype=torch.int64)

    def _rng(self) -> torch.Generator:
        worker = get_worker_info()
        if worker is None:
            return self._generator
        if self._worker_seed != worker.seed:  # a worker's copy: its own stream per epoch
            self._worker_seed = worker.seed
            mixed = (self._seed * 1_000_003 + worker.seed) % (2**63 - 1)
            self._worker_generator = torch.Generator().manual_seed(mixed)
        return self._worker_generator


# ---------------------------------------------------------------------------------------
# public anatomy bank and held-out evaluation data
# ---------------------------------------------------------------------------------------
def load_public_bank(public_dir: str | Path, image_size: int,
                     readers: Sequence[Reader] | None = None) -> PublicData:
    """Label maps of the public bank (``<public_dir>/labels`` or ``public_dir`` itself)."""
    public_dir = Path(public_dir)
    folder = public_dir / "labels" if (public_dir / "labels").is_dir() else public_dir
    if not folder.is_dir():
        raise SiteDataError(f"{public_dir}: no public label maps (expected {public_dir}/labels/)")
    readers = list(readers) if readers is not None else default_readers()
    skipped: list[SkippedFile] = []
    maps = []
    for path, reader in _scan(folder, readers, public_dir, skipped):
        for volume in _read_outcomes(path, reader, public_dir, skipped):
            try:
                check_labels(volume.array, None, _relative(volume.source, public_dir))
            except ReaderError as err:
                _skip(skipped, volume.source, str(err))
                continue
            maps.append(square_resize(volume.array, image_size, volume.spacing, "label"))
    if not maps:
        reasons = "\n  ".join(s.reason for s in skipped) or "the folder holds no files"
        raise SiteDataError(f"{folder}: no usable public label maps; reasons:\n  {reasons}")
    return PublicData(label_maps=torch.cat(maps))


@dataclass(frozen=True)
class HeldoutSite:
    """Paired held-out data of one site; row i of every site is the same subject slice."""

    images: torch.Tensor      # [N,1,H,W] float32, normalised like site images
    clean: torch.Tensor       # [N,1,H,W] float32, on the SAME scale as its noisy image
    labels: torch.Tensor      # [N,H,W] int64
    subjects: tuple[str, ...]  # subject name per row (synthetic held-out names; for pairing)
    skipped: list[SkippedFile]


def load_heldout(data_root: str | Path, split: str, image_size: int,
                 cache_dir: str | Path | None = None,
                 readers: Sequence[Reader] | None = None) -> dict[str, HeldoutSite]:
    """``<data_root>/heldout/<split>/<site>/{images,clean,labels}`` -> one HeldoutSite per site.

    ``data_root`` may also be the ``heldout`` folder itself. The clean rendering is mapped
    with its noisy image's scaling, not its own: noise and bias widen the noisy image's
    percentile range, so scaling each by its own range would shift and shrink the clean
    target relative to the image a model sees, and a perfect translation would score
    below perfect. One mapping keeps clean = expected noisy on one scale (clipped alike).
    This needs clean/ stored in the SAME units as images/ (noise-free and unquantised, so
    float); a mismatch (e.g. clean in [0, 1], images as 12-bit integers) is logged.
    A subject missing its image, clean rendering or labels is skipped at that site.
    """
    root = Path(data_root)
    split_dir = root / "heldout" / split if (root / "heldout").is_dir() else root / split
    if not split_dir.is_dir():
        raise SiteDataError(f"{split_dir}: no held-out split '{split}'; expected "
                            f"<data-root>/heldout/{split}/<site>/images|clean|labels")
    readers = list(readers) if readers is not None else default_readers()
    sites = {d.name: _heldout_site(d, image_size, readers, cache_dir)
             for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not sites:
        raise SiteDataError(f"{split_dir}: holds no site folders")
    subject_lists = {name: site.subjects for name, site in sites.items()}
    if len(set(subject_lists.values())) > 1:
        logger.warning("held-out sites in %s do not hold the same subjects (%s); paired "
                       "metrics must match rows by subject name", split_dir,
                       ", ".join(f"{k}: {len(v)}" for k, v in subject_lists.items()))
    return sites


def _heldout_site(site_dir: Path, size: int, readers: Sequence[Reader],
                  cache_dir: str | Path | None) -> HeldoutSite:
    key = fingerprint(site_dir, ("images", "clean", "labels"), _site_params(size, readers, "heldout"))
    cache = TensorCache(cache_dir, prefix="heldout") if cache_dir is not None else None
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return HeldoutSite(cached["images"], cached["clean"], cached["labels"],
                           tuple(cached["subjects"]),
                           [SkippedFile(site_dir / rel, reason) for rel, reason in cached["skipped"]])
    skipped: list[SkippedFile] = []
    folders = {name: _keyed(site_dir / name, readers, site_dir, skipped)
               for name in ("images", "clean", "labels")}
    images, clean, labels, subjects = [], [], [], []
    unit_ratios: list[float] = []  # clean's robust top / image's: ~1 when units agree
    for item, (path, reader) in folders["images"].items():
        name = _relative(path, site_dir)
        try:
            missing = [f for f in ("clean", "labels") if item not in folders[f]]
            if missing:
                raise ReaderError(f"no {' or '.join(missing)} file of the same name")
            volume = _read_single(path, reader, site_dir)
            scaling = robust_scaling(volume.array)
            twin = _read_single(*folders["clean"][item], site_dir).array
            if twin.shape != volume.array.shape or not np.isfinite(twin).all():
                raise ReaderError(f"clean rendering has shape {twin.shape} or non-finite values; "
                                  f"expected finite values of shape {volume.array.shape}")
            label_path = folders["labels"][item][0]
            label_map = _read_single(label_path, folders["labels"][item][1], site_dir).array
            check_labels(label_map, volume.array.shape, _relative(label_path, site_dir))
        except ReaderError as err:
            _skip(skipped, path, f"{name}: {err}")
            continue
        images.append(square_resize(normalise(volume.array, scaling), size, volume.spacing, "image"))
        clean.append(square_resize(normalise(twin, scaling), size, volume.spacing, "image"))
        labels.append(square_resize(label_map[..., scaling.keep], size, volume.spacing, "label"))
        subjects.extend([item] * int(scaling.keep.sum()))
        unit_ratios.append(float(np.percentile(twin, HIGH_PERCENTILE)) /
                           max(float(scaling.high.max()), 1e-12))
    if not images:
        reasons = "\n  ".join(s.reason for s in skipped) or "images/ holds no files"
        raise SiteDataError(f"{site_dir}: no usable held-out subjects; reasons:\n  {reasons}")
    ratio = float(np.median(unit_ratios))
    if not 0.25 <= ratio <= 4.0:
        logger.warning("%s: clean renderings look like they are in other units than images/ "
                       "(median ratio of their 99.5th percentiles %.3g); the contract is clean "
                       "in the same units as its image (noise-free, unquantised), otherwise "
                       "paired metrics are meaningless", site_dir, ratio)
    site = HeldoutSite(torch.cat(images).unsqueeze(1), torch.cat(clean).unsqueeze(1),
                       torch.cat(labels), tuple(subjects), skipped)
    if cache is not None:
        cache.put(key, {"images": site.images, "clean": site.clean, "labels": site.labels,
                        "subjects": list(site.subjects),
                        "skipped": [[_relative(s.path, site_dir), s.reason] for s in skipped]})
    return site
