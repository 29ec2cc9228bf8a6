"""Build a public label bank from any folder of public segmentations plus a remap table.

A public atlas or challenge release stores its own label values (FreeSurfer's 2/41 for
white matter, a challenge's 1..N, ...). The federation's generators want maps in *its*
label schema. ``build_public_bank`` reads every label file in a folder, maps each stored
value through a remap table onto a class of the schema, checks it, and writes:

    <out>/labels/<name>.nii.gz   the remapped maps (schema values, the source's affine)
    <out>/dataset.toml           the schema the maps follow (copied from --schema)
    <out>/provenance.json        sha256 of every source and output file, the remap table,
                                 the schema and its file's sha256, per-class voxel counts

Everything is written into a sibling staging folder and renamed into place at the end,
so a refused or crashed build leaves nothing behind. The remap table (TOML):

    [remap]
    "0" = "background"     # source value = target class name (or the class's value)
    "24" = "csf"
    "2" = "wm"
    "41" = "wm"

Refused with an error naming the file and value: a target that is not a class of the
schema, a source value found in a file but missing from the table, a non-integer map.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgen.data.errors import DataError, RemapError
from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import DATASET_TOML, DatasetManifest
from medgen.data.staging import staged_folder
from medgen.data.nifti_io import write_nifti

LABEL_SUFFIXES = (".nii.gz", ".nii", ".png")
PROVENANCE = "provenance.json"
TOOL = "medgen data public-bank/1"


@dataclass(frozen=True)
class RemapTable:
    """Source value -> class index of the schema, read from a remap TOML file."""

    source: Path
    mapping: dict[int, int]

    @classmethod
    def load(cls, path: str | Path, schema: LabelSchema) -> "RemapTable":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RemapError(f"remap table {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise RemapError(f"{path} is not valid TOML ({err}); fix the syntax") from None
        table = data.get("remap")
        if not isinstance(table, dict) or not table:
            raise RemapError(f"{path} has no [remap] table; write one line per source value, "
                             'e.g. [remap] "0" = "background"')
        mapping = {}
        for key, target in table.items():
            try:
                value = int(key)
            except ValueError:
                raise RemapError(f"{path} [remap] key {key!r} is not an integer source "
                                 'value; write e.g. "24" = "csf"') from None
            mapping[value] = _target_index(path, key, target, schema)
        return cls(source=path, mapping=mapping)

    def apply(self, labels: np.ndarray, source: str) -> np.ndarray:
        """Stored source values -> class indices; a value without a mapping is refused."""
        values = np.unique(labels)
        missing = [int(v) for v in values if int(v) not in self.mapping]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise RemapError(f"{source} holds value(s) {shown} that {self.source} does not "
                             f'map; add a line such as "{missing[0]}" = "<class>" under [remap]')
        out = np.zeros(labels.shape, np.int64)
        for value in values:
            out[labels == value] = self.mapping[int(value)]
        return out

    def to_dict(self, schema: LabelSchema) -> dict[str, str]:
        return {str(k): schema.names[v] for k, v in sorted(self.mapping.items())}


def build_public_bank(labels_dir: str | Path, remap_path: str | Path, schema_path: str | Path,
                      out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Validate, remap and write the bank (see the module docstring); returns provenance."""
    labels_dir, out = Path(labels_dir), Path(out_dir)
    manifest = DatasetManifest.from_file(schema_path)
    if manifest.labels is None:
        raise DataError(f"{schema_path} declares no label schema ([labels] names); a label "
                        "bank needs one")
    schema = manifest.labels
    remap = RemapTable.load(remap_path, schema)
    sources = sorted(p for p in labels_dir.rglob("*") if p.is_file() and p.name.endswith(LABEL_SUFFIXES))
    if not sources:
        raise DataError(f"{labels_dir} holds no label files ({', '.join(LABEL_SUFFIXES)})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")

    with staged_folder(out) as staging:
        records = [_convert(path, labels_dir, staging, remap, schema) for path in sources]
        _check_unique_outputs(records)
        shutil.copyfile(schema_path, staging / DATASET_TOML)
        provenance = {
            "tool": TOOL,
            "schema": {"file": str(schema_path), "sha256": _sha256(Path(schema_path)),
                       **schema.to_dict()},
            "remap": {"file": str(remap_path), "sha256": _sha256(Path(remap_path)),
                      "table": remap.to_dict(schema)},
            "files": records,
            "class_voxels": {name: sum(r["class_voxels"][name] for r in records)
                             for name in schema.names},
        }
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return provenance


def _convert(path: Path, root: Path, staging: Path, remap: RemapTable,
             schema: LabelSchema) -> dict[str, Any]:
    relative = path.relative_to(root).as_posix()
    labels, spacing = _read_labels(path, relative)
    indices = remap.apply(labels, relative)
    stem = relative[: -len(next(s for s in LABEL_SUFFIXES if relative.endswith(s)))]
    output = f"labels/{stem.replace('/', '__')}.nii.gz"
    written = write_nifti(staging / output, schema.to_values(indices), spacing, atomic=False)
    counts = np.bincount(indices.ravel(), minlength=schema.num_classes)
    return {"source": relative, "sha256": _sha256(path), "output": output,
            "output_sha256": _sha256(written), "shape": list(labels.shape),
            "class_voxels": {name: int(c) for name, c in zip(schema.names, counts)}}


def _read_labels(path: Path, relative: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer stored values and voxel spacing of a NIfTI or PNG label map."""
    if path.name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image)
        if array.ndim != 2:
            raise DataError(f"{relative} is a colour PNG; a label map is one grey channel")
        spacing: tuple[float, ...] = (1.0, 1.0)
    else:
        import nibabel as nib

        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
        spacing = tuple(float(z) for z in image.header.get_zooms()[: array.ndim])
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise DataError(f"{relative} holds non-integer values; a label map stores whole "
                            "numbers (was it resampled with interpolation?)")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iub":
        raise DataError(f"{relative} has dtype {array.dtype}, not an integer label map")
    return np.asarray(array, np.int64), spacing


def _target_index(path: Path, key: str, target: Any, schema: LabelSchema) -> int:
    if isinstance(target, str) and target in schema.names:
        return schema.names.index(target)
    if isinstance(target, int) and not isinstance(target, bool) and target in schema.values:
        return schema.values.index(target)
    raise RemapError(f"{path} [remap] \"{key}\" = {target!r}: not a class of the schema "
                     f"({schema.describe()}); use one of the class names")


def _check_unique_outputs(records: list[dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for record in records:
        if record["output"] in seen:
            raise DataError(f"{record['source']} and {seen[record['output']]} would both be "
                            f"written as {record['output']}; rename one of them")
        seen[record["output"]] = record["source"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
