"""The records of a site folder: the one reading shared by training and ``data check``.

``read_site(site_dir, readers)`` lists ``images/`` and ``labels/`` (data/site_folder.py:
no links followed, regular files only, unreadable files skipped), lets the readers claim
entries of that listing (a file, or a folder such as a DICOM series; an unclaimed folder
is walked into), then ``SiteReading.records()`` reads and validates one record at a time:

- the image: its modality agrees with the manifest (``dataset.toml`` [dataset] modality;
  a DICOM series of another Modality, e.g. a CR scout or an OT secondary capture in a CT
  folder, is left out and named; without a dataset.toml every modality is read, as before
  manifests, and data check counts them per modality), and every check training applies (data/preprocess.py:
  no NaN/inf voxel, not constant, at least one non-constant slice), normalised by the
  manifest's intensity policy (one fixed window for CT, the volume's percentiles for MR);
- its label map, per record: ``labels/<same name>`` or a segmentation read with the image
  (a DICOM SEG), checked against the image (same shape, only values of the manifest's
  label schema, mapped to class indices; a manifest with ``[labels] none = true`` reads
  no label maps). When the
  site has a ``labels/`` folder, a record without a label map is skipped alone (every
  current recipe needs labels); the site trains on the rest. A site with no ``labels/``
  folder keeps its images (``labelled`` is False; the loader warns and flags it);
- skipped alone too: a second record of the same name (x.nii.gz and x.png), a record whose
  bytes equal an earlier record's (a copy of one patient counts once), a label map with
  no image.

A record carries a patient key (a reader's non-identifying key joining two series of one
patient, else its name): the number of patients is the number of distinct keys, whatever
the folder's shape. Every problem becomes one ``SkippedFile`` whose reason starts with the
path relative to the site folder; no reason carries the site's absolute path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medgen.data.manifest import DatasetManifest
from medgen.data.preprocess import ImageScaling, check_labels, volume_scaling
from medgen.data.readers import Reader, ReaderError, SkippedFile, Volume, find_reader
from medgen.data.site_folder import SiteFolder, unreadable_reason

logger = logging.getLogger(__name__)

__all__ = ["SiteDataError", "SiteRecord", "SiteReading", "SkipLog", "read_site",
           "claimed_entries", "keyed_entries", "read_outcomes", "read_single", "item_key",
           "distinct_patients"]


class SiteDataError(ValueError):
    """Nothing usable was found; the message names the directory and every reason."""


@dataclass(frozen=True)
class SiteRecord:
    """One validated record: an image, its scaling and (if any) its checked label map."""

    key: str                      # name under images/ without suffix (in memory only)
    source: str                   # path relative to the site folder
    patient_key: str              # distinct keys = distinct patients (the privacy unit)
    volume: Volume
    scaling: ImageScaling
    labels: np.ndarray | None     # class indices (int64) of the schema, shape of volume.array
    label_source: str | None      # relative path of the label map, or "(segmentation ...)"


class SkipLog:
    """Skipped entries of one site, each logged once, named relative to the site folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.items: list[SkippedFile] = []
        self._seen: set[tuple[str, str]] = set()

    def relative(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).name

    def add(self, path: Path, why: str) -> None:
        rel = self.relative(path)
        why = self._scrub(str(why), Path(path), rel)
        if (rel, why) in self._seen:  # the listing and a reader may both meet one file
            return
        self._seen.add((rel, why))
        logger.warning("skipped %s: %s", rel, why)
        self.items.append(SkippedFile(Path(path), f"{rel}: {why}"))

    def _scrub(self, why: str, path: Path, rel: str) -> str:
        # library errors (nibabel, PIL) quote the absolute path: reasons use relative ones
        for absolute, short in ((path.resolve(), rel), (path, rel)):
            why = why.replace(str(absolute), short)
        for root in {str(self.root.resolve()), str(self.root)}:
            why = why.replace(root + "/", "").replace(root, ".")
        return why


def item_key(relpath: str, is_dir: bool) -> str:
    """Subject name: the path under its folder without its file suffix (x.nii.gz -> x)."""
    if is_dir:
        return relpath
    if relpath.lower().endswith(".nii.gz"):
        return relpath[:-7]
    suffix = Path(relpath).suffix
    return relpath[: -len(suffix)] if suffix else relpath


def _under(relpath: str, top: str) -> str:
    return relpath if top == "." else relpath[len(top) + 1:]


def claimed_entries(folder: SiteFolder, top: str, readers: Sequence[Reader],
                    skips: SkipLog) -> list[tuple[str, Reader]]:
    """(relpath, reader) of every listed entry under ``top`` that a reader claims."""
    found: list[tuple[str, Reader]] = []
    for rel in folder.children.get(top, []):
        path = folder.root / rel
        reader = find_reader(path, readers)
        if reader is not None:
            found.append((rel, reader))
        elif folder.is_dir(rel):
            found.extend(claimed_entries(folder, rel, readers, skips))
        else:
            names = ", ".join(r.name for r in readers)
            skips.add(path, f"no reader for this file type: not an image medgen reads "
                            f"(readers: {names})")
    return found


def keyed_entries(folder: SiteFolder, top: str, readers: Sequence[Reader],
                  skips: SkipLog) -> dict[str, tuple[str, Reader]]:
    """``claimed_entries`` by subject name; a second entry of one name is skipped."""
    items: dict[str, tuple[str, Reader]] = {}
    for rel, reader in claimed_entries(folder, top, readers, skips):
        key = item_key(_under(rel, top), folder.is_dir(rel))
        if key in items:
            skips.add(folder.root / rel, f"same name as {items[key][0]}; one file per subject")
        else:
            items[key] = (rel, reader)
    return items


def read_outcomes(path: Path, reader: Reader) -> list[Volume | SkippedFile]:
    """Everything ``reader`` finds at ``path``; ReaderError/OSError/bugs become one skip."""
    try:
        result = reader.read(path)
        return [result] if isinstance(result, Volume) else list(result)
    except ReaderError as err:
        return [SkippedFile(path, str(err))]
    except OSError as err:
        return [SkippedFile(path, unreadable_reason(err))]
    except Exception as err:  # a reader bug must not take the whole site down
        return [SkippedFile(path, f"reader '{reader.name}' failed ({type(err).__name__}: {err})")]


def read_single(path: Path, reader: Reader) -> Volume:
    """Exactly one volume, or ReaderError saying why (the caller names the file)."""
    volumes = []
    for outcome in read_outcomes(path, reader):
        if isinstance(outcome, SkippedFile):
            raise ReaderError(outcome.reason)
        volumes.append(outcome)
    if len(volumes) != 1:
        raise ReaderError(f"holds {len(volumes)} volumes; expected exactly one")
    return volumes[0]


@dataclass
class SiteReading:
    """A listed site folder; ``records()`` reads it (once) and fills ``skips``."""

    folder: SiteFolder
    readers: Sequence[Reader]
    images: str = "images"
    labels: str = "labels"
    need_labels: bool = True
    manifest: DatasetManifest = field(default_factory=DatasetManifest.default_brain)
    skips: SkipLog = field(init=False)

    def __post_init__(self) -> None:
        self.skips = SkipLog(self.folder.root)
        for rel, reason in self.folder.skipped:
            self.skips.add(self.folder.root / rel, reason)

    @property
    def has_images_folder(self) -> bool:
        return self.images in self.folder.present

    @property
    def labelled(self) -> bool:
        """The site has a labels/ folder and its manifest a label schema: label maps are
        expected per record."""
        return self.labels in self.folder.present and self.manifest.labels is not None

    @property
    def skipped(self) -> list[SkippedFile]:
        return self.skips.items

    def records(self) -> Iterator[SiteRecord]:
        folder, skips, root = self.folder, self.skips, self.folder.root
        labels = keyed_entries(folder, self.labels, self.readers, skips) if self.labelled else {}
        images_dir = root if self.images == "." else root / self.images
        seen: dict[str, str] = {}      # subject name -> source
        copies: dict[str | None, str] = {}  # content digest of a kept record -> its source
        unusable = self._skipped_entries(self.images)  # subject name -> image entry skipped
        for rel, reader in claimed_entries(folder, self.images, self.readers, skips):
            path = root / rel
            unusable.setdefault(item_key(_under(rel, self.images), folder.is_dir(rel)), rel)
            this_read: set[str] = set()
            for outcome in read_outcomes(path, reader):
                if isinstance(outcome, SkippedFile):
                    skips.add(outcome.path, outcome.reason)
                    continue
                # a reader reporting several volumes names each by its own source under
                # images/; several series in one folder share it, so they are numbered
                source = outcome.source if outcome.source.is_relative_to(images_dir) else path
                source_rel = skips.relative(source)
                item = item_key(_under(source_rel, self.images), folder.is_dir(source_rel))
                item = f"{item}#{len(this_read)}" if item in this_read else item
                this_read.add(item)
                if item in seen:
                    skips.add(source, f"same name as {seen[item]}; one file per subject")
                    continue
                seen[item] = source_rel
                digest = folder.content_digest(source_rel) if folder.files_under(source_rel) else None
                if copies.get(digest, source_rel) != source_rel:
                    skips.add(source, f"the same bytes as {copies[digest]}: one patient's copy "
                                      "is counted once")
                    continue
                try:
                    record = self._record(outcome, item, source_rel, labels.get(item))
                except ReaderError as err:
                    skips.add(source, str(err))
                    continue
                if digest is not None:
                    copies[digest] = source_rel  # kept records only: a bad original hides no copy
                yield record
        for item in sorted(set(labels) - set(seen)):
            image = unusable.get(item)
            skips.add(root / labels[item][0], f"not used: its image {image} was skipped (see its "
                      "reason)" if image else "label map with no image of the same name in "
                      f"{self.images}/")

    def _record(self, volume: Volume, item: str, source: str,
                label: tuple[str, Reader] | None) -> SiteRecord:
        modality = volume.meta.get("modality")
        declared = bool(self.manifest.sources)  # the brain default declares no modality
        if declared and modality is not None and modality != self.manifest.modality:
            raise ReaderError(f"modality {modality} contradicts the manifest's "
                              f"{self.manifest.modality} ({_manifest_name(self.manifest)}): "
                              "left out; move it to a site folder of its own modality")
        scaling = volume_scaling(volume.array, self.manifest.intensity)
        label_array, label_source = None, None
        if self.manifest.labels is None:
            pass  # unlabelled data (dataset.toml [labels] none = true): no label map is read
        elif label is not None:
            try:
                label_array = read_single(self.folder.root / label[0], label[1]).array
            except ReaderError as err:
                raise ReaderError(f"label map {label[0]}: {err}") from None
            label_source = label[0]
        elif volume.meta.get("labels") is not None:  # e.g. a DICOM SEG read with its series
            label_array = np.asarray(volume.meta["labels"], dtype=np.float32)
            label_source = f"(segmentation read with {source})"
        elif self.labelled and self.need_labels:
            bad = self._skipped_entries(self.labels).get(item)
            if bad is not None:
                raise ReaderError(f"no label map: {bad} was skipped (see its reason); this record "
                                  "is skipped too, the site trains on the others")
            raise ReaderError(f"no label map: expected {self.labels}/{item}.nii.gz (or .png, or "
                              "a DICOM SEG in its series folder); this record is skipped, the "
                              "site trains on the others")
        if label_array is not None:
            label_array = check_labels(label_array, volume.array.shape, label_source,
                                       self.manifest.labels)
        patient_key = str(volume.meta.get("patient_key", item))
        return SiteRecord(item, source, patient_key, volume, scaling, label_array, label_source)


    def _skipped_entries(self, top: str) -> dict[str, str]:
        """Subject name -> entry under ``top`` the listing skipped (unreadable, a FIFO...)."""
        prefix = "" if top == "." else top + "/"
        return {item_key(rel[len(prefix):], False): rel
                for rel, _ in self.folder.skipped if rel.startswith(prefix)}


def read_site(site_dir: str | Path, readers: Sequence[Reader], *, need_labels: bool = True,
              folder: SiteFolder | None = None,
              manifest: DatasetManifest | None = None) -> SiteReading:
    """The reading of ``site_dir``'s images/ and labels/ (``folder``: an existing listing)."""
    folder = folder if folder is not None else SiteFolder.scan(site_dir, ("images", "labels"))
    return SiteReading(folder, list(readers), need_labels=need_labels,
                       manifest=manifest or DatasetManifest.default_brain())


def _manifest_name(manifest: DatasetManifest) -> str:
    return " + ".join(Path(s).name if s else "" for s in manifest.sources) or "the brain default"


def distinct_patients(records: Sequence[SiteRecord]) -> int:
    return len({r.patient_key for r in records})
