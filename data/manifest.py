"""DatasetManifest: what a dataset is, read from ``dataset.toml`` (docs/data-model.md).

A federation's root and each site folder may hold a ``dataset.toml``. The site's file is
read over the root's: a table present in the site file replaces the root's table whole
(keys are never mixed across files, so an MR site under a CT root cannot inherit a CT
window). One rule is checked across files: a site of the root's modality may not declare
another fixed window, because a CT window means something only if it is the same at every
site. Data without any dataset.toml is the brain default (``DatasetManifest.default_brain``),
which is what medgen assumed before manifests existed.

    [dataset]    modality = "CT"        DICOM modality code (MR, CT, PT, ...)
                 dims = 2               2: slices; 3: volumes
                 name = "head-ct"       optional, for reports
    [intensity]  units = "HU"           "HU" (CT, required) or "arbitrary"
                 normalisation = "window"         CT: one fixed window [lo, hi] in HU
                 window = [-1000, 2000]
                 display_window = [-150, 250]   optional: how reports show images
                 # normalisation = "percentile"   MR: per volume robust range
                 # percentiles = [0.5, 99.5]
    [labels]     names = ["background", "csf", "gm", "wm"]
                 values = [0, 1, 2, 3]  optional (0..K-1); `none = true`: unlabelled data
    [geometry]   spacing = "as-stored"  or [x, y(, z)] mm to resample to
                 orientation = "as-stored"  or a 3-letter code such as "RAS"
    [paired]     modality = "MR"        optional: every patient also has an image of this
                 folder = "paired"      modality, same file name, in this folder
                 registered = false     whether the pairs are aligned voxel for voxel
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from medgen.atomic import atomic_write_text
from medgen.data.errors import ManifestError
from medgen.data.label_schema import LabelSchema

DATASET_TOML = "dataset.toml"
MODALITIES = ("MR", "CT", "PT", "NM", "CR", "DX", "MG", "US", "XA", "OT")
UNITS = ("HU", "arbitrary")
DEFAULT_CT_WINDOW = (-1000.0, 2000.0)
"""Air (-1000 HU) to dense cortical bone: every tissue of a head CT keeps its HU."""
DEFAULT_CT_DISPLAY_WINDOW = (-150.0, 250.0)
"""How reports show CT: the soft-tissue window (level 50, width 400 HU): air black, fat
dark grey, CSF below grey and white matter, scalp grey, bone white. The 3000 HU training
window would show every soft tissue as one flat grey."""
DEFAULT_PERCENTILES = (0.5, 99.5)
BRAIN_CLASSES = ("background", "csf", "gm", "wm")
"""The simulated brain federation's classes: only the default manifest names them."""
KNOWN_KEYS = {
    "dataset": {"modality", "dims", "name"},
    "intensity": {"units", "normalisation", "window", "percentiles", "display_window"},
    "labels": {"names", "values", "none"},
    "geometry": {"spacing", "orientation"},
    "paired": {"modality", "folder", "registered"},
}


@dataclass(frozen=True)
class IntensityPolicy:
    """How stored intensities become network inputs in [-1, 1] (medgen.data.intensity)."""

    units: str = "arbitrary"
    normalisation: str = "percentile"  # "window" (fixed, e.g. CT) or "percentile" (per volume)
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    display_window: tuple[float, float] | None = None   # as written; see ``display``

    @property
    def display(self) -> tuple[float, float] | None:
        """The fixed window images are shown through in physical units, or None (show the
        whole normalised range: per-volume MR has no fixed physical scale to window)."""
        if self.normalisation != "window":
            return None
        if self.display_window is not None:
            return self.display_window
        return DEFAULT_CT_DISPLAY_WINDOW if self.units == "HU" else self.window

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": self.units, "normalisation": self.normalisation}
        if self.normalisation == "window":
            out["window"] = list(self.window or ())
            if self.display_window is not None:
                out["display_window"] = list(self.display_window)
        else:
            out["percentiles"] = list(self.percentiles)
        return out


@dataclass(frozen=True)
class GeometryPolicy:
    """Spacing and orientation the data is used at ('as-stored' keeps the files' own)."""

    spacing: str | tuple[float, ...] = "as-stored"
    orientation: str = "as-stored"

    def to_dict(self) -> dict[str, Any]:
        spacing = self.spacing if isinstance(self.spacing, str) else list(self.spacing)
        return {"spacing": spacing, "orientation": self.orientation}


@dataclass(frozen=True)
class PairedModality:
    """A paired site's second modality: ``folder/<name>`` is the same patient as
    ``images/<name>``, in ``modality``, read with that modality's default intensity policy
    (MR: per-volume percentiles; CT: the default HU window) and no label maps of its own.
    ``registered`` False: the pair is misaligned (different pose), as acquired."""

    modality: str
    folder: str = "paired"
    registered: bool = False

    def manifest(self, primary: "DatasetManifest") -> "DatasetManifest":
        """How the paired folder is read: its modality, that modality's default intensity
        policy, the primary's dims and geometry, no labels."""
        where = " + ".join(primary.sources) or "dataset.toml"
        return DatasetManifest(modality=self.modality, intensity=_intensity({}, self.modality, where),
                               labels=None, dims=primary.dims, geometry=primary.geometry,
                               name=f"{primary.name} paired {self.modality}".strip())

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "folder": self.folder, "registered": self.registered}


@dataclass(frozen=True)
class DatasetManifest:
    modality: str
    intensity: IntensityPolicy
    labels: LabelSchema | None
    dims: int = 2
    geometry: GeometryPolicy = field(default_factory=GeometryPolicy)
    name: str = ""
    sources: tuple[str, ...] = ()  # the dataset.toml files read, root first ("" = default)
    paired: PairedModality | None = None  # [paired]: a second modality per patient

    @classmethod
    def default_brain(cls) -> "DatasetManifest":
        """Data without dataset.toml: MR, per-volume 0.5..99.5 percentiles, 4 brain classes."""
        return cls(modality="MR", intensity=IntensityPolicy(), dims=2, name="brain (default)",
                   labels=LabelSchema.from_names(BRAIN_CLASSES))

    @classmethod
    def from_file(cls, path: str | Path) -> "DatasetManifest":
        return cls.from_tables(read_tables(Path(path)), (str(path),))

    @classmethod
    def from_tables(cls, tables: Mapping[str, Any], sources: tuple[str, ...]) -> "DatasetManifest":
        where = " + ".join(sources) or "dataset.toml"
        dataset = tables.get("dataset", {})
        modality = _get(dataset, "dataset", "modality", where, required=True)
        if modality not in MODALITIES:
            _fail(where, "dataset", "modality", f"= {modality!r} is not a modality medgen "
                  f"knows; use one of {', '.join(MODALITIES)} (the DICOM Modality code)")
        dims = _get(dataset, "dataset", "dims", where, default=2)
        if dims not in (2, 3) or isinstance(dims, bool):
            _fail(where, "dataset", "dims", f"= {dims!r} must be 2 (slices) or 3 (volumes)")
        return cls(modality=modality, dims=dims, name=str(dataset.get("name", "")),
                   intensity=_intensity(tables.get("intensity", {}), modality, where),
                   labels=_labels(tables.get("labels"), where),
                   geometry=_geometry(tables.get("geometry", {}), where), sources=sources,
                   paired=_paired(tables.get("paired"), where))

    def to_tables(self) -> dict[str, dict[str, Any]]:
        dataset: dict[str, Any] = {"modality": self.modality, "dims": self.dims}
        if self.name:
            dataset["name"] = self.name
        labels = self.labels.to_dict() if self.labels is not None else {"none": True}
        tables = {"dataset": dataset, "intensity": self.intensity.to_dict(), "labels": labels,
                  "geometry": self.geometry.to_dict()}
        if self.paired is not None:  # only then: unpaired manifests (and cache keys) unchanged
            tables["paired"] = self.paired.to_dict()
        return tables

    def to_toml(self) -> str:
        lines = ["# What medgen needs to know about this data (docs/data-model.md)."]
        for table, items in self.to_tables().items():
            lines += ["", f"[{table}]"] + [f"{key} = {_toml_value(v)}" for key, v in items.items()]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/dataset.toml`` atomically; returns its path."""
        return atomic_write_text(Path(folder) / DATASET_TOML, self.to_toml())

    def with_labels(self, labels: LabelSchema | None) -> "DatasetManifest":
        return replace(self, labels=labels)


def load_manifest(site_dir: str | Path | None = None,
                  root: str | Path | None = None) -> DatasetManifest:
    """The manifest of a site: root/dataset.toml read under site_dir/dataset.toml.

    Neither file present: ``DatasetManifest.default_brain()`` (data from before manifests).
    """
    files = [Path(folder) / DATASET_TOML for folder in (root, site_dir) if folder is not None]
    present = [(path, read_tables(path)) for path in files if path.is_file()]
    if not present:
        return DatasetManifest.default_brain()
    merged: dict[str, Any] = {}
    for path, tables in present:
        merged.update(tables)  # a table in the later (site) file replaces the root's whole
    manifest = DatasetManifest.from_tables(merged, tuple(str(p) for p, _ in present))
    if len(present) == 2:
        _check_same_window(present[0], present[1])
    return manifest


def read_tables(path: Path) -> dict[str, Any]:
    """Parse one dataset.toml and refuse unknown tables and keys (typos would be ignored)."""
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist; write one (docs/data-model.md) or point "
                            "at the folder that holds it") from None
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(f"{path} is not valid TOML ({err}); fix the syntax") from None
    for table, items in tables.items():
        if table not in KNOWN_KEYS or not isinstance(items, dict):
            raise ManifestError(f"{path}: unknown table [{table}]; known tables: "
                                f"{', '.join(f'[{t}]' for t in KNOWN_KEYS)}")
        unknown = sorted(set(items) - KNOWN_KEYS[table])
        if unknown:
            raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)} in [{table}]; "
                                f"known keys: {', '.join(sorted(KNOWN_KEYS[table]))}")
    return tables


def _intensity(table: Mapping[str, Any], modality: str, where: str) -> IntensityPolicy:
    default_units = "HU" if modality == "CT" else "arbitrary"
    units = _get(table, "intensity", "units", where, default=default_units)
    if units not in UNITS:
        _fail(where, "intensity", "units", f"= {units!r}; use one of {', '.join(UNITS)}")
    if modality == "CT" and units != "HU":
        _fail(where, "intensity", "units", f"= {units!r} but modality is CT: CT intensities "
              "are Hounsfield units; set units = \"HU\"")
    default_norm = "window" if modality == "CT" else "percentile"
    normalisation = _get(table, "intensity", "normalisation", where, default=default_norm)
    if normalisation not in ("window", "percentile"):
        _fail(where, "intensity", "normalisation", f"= {normalisation!r}; use \"window\" "
              "(one fixed range, e.g. CT in HU) or \"percentile\" (per volume, e.g. MR)")
    if modality == "CT" and normalisation != "window":
        _fail(where, "intensity", "normalisation", "must be \"window\" for CT: one fixed HU "
              "window at every site keeps HU comparable and invertible")
    if normalisation == "window":
        window = _pair(table.get("window", DEFAULT_CT_WINDOW if units == "HU" else None),
                       where, "window", "[lo, hi] in the data's units, e.g. [-1000, 2000]")
        display = table.get("display_window")
        if display is not None:
            display = _pair(display, where, "display_window", "[lo, hi] in the data's units, "
                            "e.g. [-150, 250] (level 50, width 400 HU)")
        return IntensityPolicy(units=units, normalisation="window", window=window,
                               display_window=display)
    if "display_window" in table:
        _fail(where, "intensity", "display_window", "is only meaningful with normalisation = "
              "\"window\" (a fixed physical scale); remove it")
    percentiles = _pair(table.get("percentiles", DEFAULT_PERCENTILES), where, "percentiles",
                        "[low, high] percentiles, e.g. [0.5, 99.5]")
    if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        _fail(where, "intensity", "percentiles", f"= {list(percentiles)} must satisfy "
              "0 <= low < high <= 100")
    return IntensityPolicy(units=units, normalisation="percentile", percentiles=percentiles)


def _labels(table: Mapping[str, Any] | None, where: str) -> LabelSchema | None:
    if table is None or table.get("none") is True:
        if table and ("names" in table or "values" in table):
            _fail(where, "labels", "none", "= true but names/values are given too; keep one")
        return None
    if "names" not in table:
        _fail(where, "labels", "names", "is missing: list the class names in value order, "
              "e.g. names = [\"background\", \"csf\", \"gm\", \"wm\"], or set none = true")
    try:
        return LabelSchema.from_dict(table)
    except (ValueError, TypeError) as err:
        _fail(where, "labels", "names/values", f"are not a valid label schema: {err}")
    raise AssertionError  # unreachable: _fail raises


def _geometry(table: Mapping[str, Any], where: str) -> GeometryPolicy:
    spacing = table.get("spacing", "as-stored")
    if spacing != "as-stored":
        ok = isinstance(spacing, list) and len(spacing) in (2, 3) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in spacing)
        if not ok:
            _fail(where, "geometry", "spacing", f"= {spacing!r}; use \"as-stored\" or a list "
                  "of 2 or 3 positive millimetre values, e.g. [1.0, 1.0, 3.0]")
        spacing = tuple(float(v) for v in spacing)
    orientation = table.get("orientation", "as-stored")
    if orientation != "as-stored":
        axes = [{"R": "x", "L": "x", "A": "y", "P": "y", "S": "z", "I": "z"}.get(c)
                for c in str(orientation)]
        if len(axes) != 3 or None in axes or len(set(axes)) != 3:
            _fail(where, "geometry", "orientation", f"= {orientation!r}; use \"as-stored\" "
                  "or a 3-letter code with one of R/L, A/P, S/I each, e.g. \"RAS\"")
    return GeometryPolicy(spacing=spacing, orientation=str(orientation))


def _paired(table: Mapping[str, Any] | None, where: str) -> PairedModality | None:
    if table is None:
        return None
    modality = _get(table, "paired", "modality", where, required=True)
    if modality not in MODALITIES:
        _fail(where, "paired", "modality", f"= {modality!r} is not a modality medgen knows; "
              f"use one of {', '.join(MODALITIES)}")
    folder = _get(table, "paired", "folder", where, default="paired")
    if (not isinstance(folder, str) or folder in ("", ".", "..", "images", "labels")
            or "/" in folder or "\\" in folder or folder.startswith(".")):
        _fail(where, "paired", "folder", f"= {folder!r} must name one folder beside images/ "
              "(not images or labels), e.g. \"paired\"")
    registered = _get(table, "paired", "registered", where, default=False)
    if not isinstance(registered, bool):
        _fail(where, "paired", "registered", f"= {registered!r} must be true or false")
    return PairedModality(modality=modality, folder=folder, registered=registered)


def _check_same_window(root: tuple[Path, dict], site: tuple[Path, dict]) -> None:
    """A site of the root's modality may not move the root's fixed window."""
    (root_path, root_tables), (site_path, site_tables) = root, site
    if "intensity" not in site_tables:
        return  # the root's table (or its defaults) applies unchanged
    root_m = DatasetManifest.from_tables(root_tables, (str(root_path),))
    site_m = DatasetManifest.from_tables({**root_tables, **site_tables}, (str(site_path),))
    if (root_m.modality == site_m.modality and root_m.intensity.normalisation == "window"
            and (site_m.intensity.window, site_m.intensity.display)
            != (root_m.intensity.window, root_m.intensity.display)):
        raise ManifestError(
            f"{site_path} [intensity] window = {list(site_m.intensity.window or ())} (display "
            f"{list(site_m.intensity.display or ())}) differs from {root_path} window = "
            f"{list(root_m.intensity.window or ())} (display {list(root_m.intensity.display or ())}): a fixed "
            f"{root_m.modality} window must be identical at every site; remove it from the "
            "site file or make it equal")


def _get(table: Mapping[str, Any], name: str, key: str, where: str, *, required: bool = False,
         default: Any = None) -> Any:
    if key not in table:
        if required:
            _fail(where, name, key, "is missing; it is required")
        return default
    return table[key]


def _pair(value: Any, where: str, key: str, what: str) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or float(value[0]) >= float(value[1]):
        _fail(where, "intensity", key, f"= {value!r} must be {what} with lo < hi")
    return float(value[0]), float(value[1])


def _fail(where: str, table: str, key: str, problem: str) -> None:
    raise ManifestError(f"{where}: [{table}] {key} {problem}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
