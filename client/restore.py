"""`medgen restore`: a hospital denoises or up-samples its own files with a trained restoration run, locally.

    medgen restore SITE_DIR --run-dir RUN --site A --out OUT_DIR [--series KEY] [--task denoise|sr2|sr4]
                   [--trained-units HU]
    medgen-client restore SITE_DIR --run-dir RUN --state /var/lib/medgen --out OUT_DIR   # a deployed hospital
    (also: python -m medgen.client.restore ...)

RUN is a finished run of a recipe that declares the ``Restoration`` ability below
(restore-diffusion, blind-denoise): config.toml + checkpoint.pt (its final shared weights)
as `medgen-server` writes them (in a deployment the coordinator hands its run folder's
config.toml, checkpoint.pt and DONE to the hospitals: DP releases, no patient data).
``--site`` is the site these scans come from (the model is conditioned on it). ``--state``
is a deployed hospital's node folder (``medgen-client --state``): its node-config.toml
names the site (the default for ``--site``) and the data folder the node trained on, whose
dataset.toml the input must match (a deployed run's config names no data). SITE_DIR is a site folder (images/, dataset.toml; docs/data-layout.md)
read exactly as training reads it (client/translate.py's ``read_site_records``: no links
followed, the manifest's filter and checks, skipped records named on stderr); ``--series``
restores only the records whose key starts with KEY (one series of the folder).

Refused, before anything is written, with the file/field and what to do: a run whose recipe
cannot restore; ``--task`` other than the run's (``options.task``); inpainting (no mask
input); a site the run does not know; data in other units than the run trained on (the
node's training folder with ``--state``, else the run's site manifest under its
data-root, else ``--trained-units``), another modality, or
another CT window; a series whose in-plane grid is not the model's (image-size for
denoising, image-size / f for xf super-resolution: a model learnt its noise and its scale
on that grid, and resampling would change both).

Intensities: each record goes to [-1, 1] by its manifest's intensity map and comes back by
that map's exact inverse (data/intensity.py), so the output is in the input's physical units
(HU for CT). Output, a new site folder built in a staging folder and renamed into place
(never half-written, never overwritten; input files are only read):
- DICOM input -> images/<key>/slice_NNNN.dcm: a NEW series (data/dicom_writer.py: new Study/
  Series/SOP Instance UIDs, Rescale Slope/Intercept so the modality LUT returns HU,
  ImageType DERIVED\\SECONDARY, "restored (<task>)" in the description, no patient identifier
  copied), with the source's ImageOrientationPatient and per-slice ImagePositionPatient; for
  xf super-resolution PixelSpacing / f and each position moved to the centre of the new
  first pixel, so the result overlays the original in a viewer;
- NIfTI input -> images/<key>.nii.gz with the source's affine (qform/sform and codes), for
  xf super-resolution the in-plane axes scaled by 1/f about the same field of view.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import tomllib
from pathlib import Path
from typing import Any, Protocol

import nibabel
import numpy as np
import pydicom
import torch

from medgen.client.translate import _nifti_header, read_site_records
from medgen.config import RunConfig
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.manifest import DatasetManifest
from medgen.data.nifti_io import hu_to_int16
from medgen.data.preprocess import normalise
from medgen.data.site_data import site_manifest
from medgen.data.site_records import SiteRecord
from medgen.data.staging import staged_folder
from medgen.models.capabilities import declares
from medgen.models.degradations import SR_FACTORS, upsample
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import load_checkpoint
from medgen.server.run_log import RunDir

RESTORABLE = ("denoise", *SR_FACTORS)


class RestoreError(ValueError):
    """An input or run cannot be used; the message names it and says what to do."""


class Restoration(Protocol):
    """What `medgen restore` needs of a recipe: its task's forward model and a restorer."""

    def degradation(self, intensity: Any = None) -> Any:
        """The task's forward model (``.task``: denoise, sr2, sr4, inpaint)."""

    def restore(self, model: torch.nn.Module, condition: torch.Tensor, site_index: Any,
                generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Restored images [N,1,S,S] in [-1, 1] from the task's condition [N,C,S,S]."""


class Restorer:
    """A finished run's model, bound to one site and one task."""

    def __init__(self, run_dir: Path, site: str, task: str | None = None,
                 trained_units: str | None = None, seed: int = 0, trained_data: Path | None = None):
        run_dir = Path(run_dir)
        if not (run_dir / "config.toml").is_file():
            raise RestoreError(f"{run_dir / 'config.toml'} does not exist: --run-dir must be a trained run")
        config = RunConfig.from_toml(run_dir / "config.toml")
        self.recipe = build_recipe(config)
        if not declares(self.recipe, Restoration):
            raise RestoreError(f"{run_dir / 'config.toml'}: recipe '{config.recipe}' is not a restoration "
                               "recipe (it declares no degradation/restore); train restore-diffusion or "
                               "blind-denoise and pass that run")
        self.task = self.recipe.degradation().task
        if task is not None and task != self.task:
            raise RestoreError(f"--task {task}, but {run_dir / 'config.toml'} trained '{self.task}' "
                               f"(options.task); pass --task {self.task} or a run trained for {task}")
        if self.task not in RESTORABLE:
            raise RestoreError(f"{run_dir} trained '{self.task}', which medgen restore does not apply "
                               f"(no mask input); it applies {', '.join(RESTORABLE)}")
        if site not in config.site_names:
            raise RestoreError(f"--site {site} is not a site of this run: {', '.join(config.site_names)}")
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None:
            raise RestoreError(f"{run_dir}/checkpoint.pt does not exist: train the run first")
        if RunDir(run_dir).read_done() is None:
            print(f"medgen restore: {run_dir} has no DONE marker (unfinished?); using its latest "
                  f"checkpoint, round {checkpoint.server_round}", file=sys.stderr)
        self.model = self.recipe.build()
        self.model.load_state_dict({**self.model.state_dict(), **checkpoint.shared_state})
        self.model.eval()
        self.size, self.site_index, self.seed = config.image_size, list(config.site_names).index(site), seed
        self.factor = SR_FACTORS.get(self.task, 1)
        # the folder this site's node trained on (a deployed hospital, --state), else the run's data-root
        self.trained = site_manifest(trained_data) if trained_data is not None else _trained_manifest(config, site)
        self.trained_from = Path(trained_data) / "dataset.toml" if trained_data is not None else run_dir
        self.trained_units = trained_units
        self.where = run_dir

    def check_manifest(self, manifest: DatasetManifest, site_dir: Path) -> None:
        """Refuse data in other units, modality or CT window than the run trained on."""
        toml = Path(site_dir) / "dataset.toml"
        if self.trained is None:
            if self.trained_units is None:
                raise RestoreError(f"{self.where}: the units this run trained on are unknown (its config has "
                                   "no data-root manifest); pass --trained-units (e.g. HU)")
            if manifest.intensity.units != self.trained_units:
                raise RestoreError(f"{toml}: [intensity] units = {manifest.intensity.units!r}, but the run "
                                   f"trained on {self.trained_units!r} (--trained-units); use a run of that unit")
            return
        for field, ours, theirs in (("[dataset] modality", manifest.modality, self.trained.modality),
                                    ("[intensity] units", manifest.intensity.units, self.trained.intensity.units),
                                    ("[intensity] normalisation", manifest.intensity.normalisation,
                                     self.trained.intensity.normalisation),
                                    ("[intensity] window", manifest.intensity.window, self.trained.intensity.window)):
            if ours != theirs:
                raise RestoreError(f"{toml}: {field} = {ours!r}, but the run trained on {theirs!r} "
                                   f"({self.trained_from}); restore with a run trained on such data")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Measurements [N,1,s,s] in [-1, 1] -> restored [N,1,S,S] (S = s x factor)."""
        condition = upsample(images, self.size) if self.factor > 1 else images
        with torch.no_grad():
            out = self.recipe.restore(self.model, condition, self.site_index, torch.Generator().manual_seed(self.seed))
        return out.float().cpu()


def _trained_manifest(config: RunConfig, site: str) -> DatasetManifest | None:
    """The manifest the run's site trained with, if the run names its data (simulation)."""
    root = Path(config.data_root) if config.data_root else None
    if root is None or not (root / "dataset.toml").is_file():
        return None
    site_dir = root / "sites" / site
    return site_manifest(site_dir, root=root) if site_dir.is_dir() else site_manifest(root, root=root)


def node_training(state_dir: Path) -> tuple[str, Path]:
    """(site, training data folder) of the deployed hospital node whose ``--state`` is
    ``state_dir``, from the node-config.toml medgen-client wrote there (client/cli.py)."""
    path = Path(state_dir) / "node-config.toml"
    if not path.is_file():
        raise RestoreError(f"{path} does not exist: --state must be the folder this hospital's "
                           "`medgen-client --state` used (it holds node-config.toml)")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RestoreError(f"{path} is not valid TOML ({err}); start the node once with medgen-client "
                           "to rewrite it") from None
    missing = [key for key in ("site", "data-dir") if not isinstance(values.get(key), str)]
    if missing:
        raise RestoreError(f"{path} has no {' or '.join(missing)}; start the node once with "
                           "medgen-client to rewrite it, or pass --site and --trained-units")
    return values["site"], Path(values["data-dir"])


def restore_record(record: SiteRecord, restorer: Restorer) -> np.ndarray:
    """One record's (h, w, S) physical values -> restored physical values (h f, w f, S)."""
    array, scaling, f = np.asarray(record.volume.array, np.float64), record.scaling, restorer.factor
    expected = restorer.size // f
    if array.shape[:2] != (expected, expected):
        raise RestoreError(f"{record.source}: slices are {array.shape[0]}x{array.shape[1]} px, the model "
                           f"{'denoises' if f == 1 else f'up-samples x{f} from'} {expected}x{expected} px "
                           f"(the run's image-size {restorer.size}); restore with a run trained on this grid")
    if scaling.intensity is None:
        raise RestoreError(f"{record.source}: no intensity map (read without a manifest)")
    out = np.repeat(np.repeat(array, f, axis=0), f, axis=1)  # constant slices: kept as they are
    if scaling.keep.any():
        x = torch.from_numpy(np.moveaxis(normalise(array, scaling), -1, 0))[:, None]
        y = restorer(x)[:, 0].numpy()
        out[..., scaling.keep] = np.moveaxis(scaling.intensity.inverse(y), 0, -1)
    return out


def restore_site(site_dir: Path, out: Path, restorer: Restorer, series: str | None = None) -> list[Path]:
    """Restore every usable record of ``site_dir`` (or those whose key starts with ``series``)."""
    site_dir, out = Path(site_dir), Path(out)
    if out.exists():
        raise RestoreError(f"{out} exists; medgen restore never overwrites: choose a new --out")
    if out.resolve() == site_dir.resolve() or site_dir.resolve() in out.resolve().parents:
        raise RestoreError(f"--out {out} is inside the input site {site_dir}; choose another folder")
    manifest, records, skipped = read_site_records(site_dir)
    restorer.check_manifest(manifest, site_dir)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    records = [r for r in records if series is None or r.key.startswith(series)]
    if not records:
        raise RestoreError(f"{site_dir}: no usable record{f' named {series}*' if series else ''} to restore "
                           "(run `medgen data check` on it)")
    restored = [(record, restore_record(record, restorer)) for record in records]  # all checked first
    units, f = manifest.intensity.units, restorer.factor
    window = manifest.intensity.window if manifest.intensity.normalisation == "window" else None
    written = []
    with staged_folder(out) as staging:
        manifest.write(staging)
        for record, physical in restored:
            name = record.key.replace("#", "_")
            if record.volume.meta.get("format") == "dicom":
                row, col, thick = record.volume.spacing or (1.0, 1.0, 1.0)
                seed = int(hashlib.sha256(f"restore/{record.source}".encode()).hexdigest()[:12], 16)
                files = write_physical_dicom(staging / "images" / name, physical, (row / f, col / f, thick),
                                             modality=manifest.modality, units=units, seed=seed, window=window,
                                             description=f"medgen (restored: {restorer.task})")
                _dicom_geometry(files, record.volume.meta, (row, col), f)
                written.append(out / "images" / name)
            else:
                path = staging / "images" / f"{name}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_nifti(path, physical, units, record.volume.source, f)
                written.append(out / "images" / path.name)
    return written


def _in_plane(f: int) -> np.ndarray:
    """New voxel index -> source voxel index for xf up-sampling of axes 0 and 1 (pixel centres:
    i_src = i_new / f + (1 - f) / (2 f), the same field of view)."""
    m = np.eye(4)
    m[0, 0] = m[1, 1] = 1.0 / f
    m[0, 3] = m[1, 3] = (1.0 - f) / (2.0 * f)
    return m


def _write_nifti(path: Path, physical: np.ndarray, units: str, source: Path, f: int) -> None:
    """``physical`` with the source's geometry, the in-plane axes scaled for xf super-resolution."""
    header = _nifti_header(Path(source))
    values = physical[..., 0] if physical.ndim == 3 and physical.shape[-1] == 1 else physical
    values = hu_to_int16(values) if units == "HU" else np.asarray(values, np.float32)
    source_shape = tuple(header.get_data_shape())
    if values.shape[2:] != source_shape[2:] or values.shape[:2] != tuple(s * f for s in source_shape[:2]):
        raise RestoreError(f"{source}: restored shape {values.shape} does not fit the file's {source_shape} x{f}")
    image = nibabel.Nifti1Image(values, None)
    scale = _in_plane(f)
    image.header.set_qform(header.get_qform() @ scale, code=int(header["qform_code"]))
    image.header.set_sform(header.get_sform() @ scale, code=int(header["sform_code"]))
    zooms = list(header.get_zooms()[:values.ndim])
    zooms[0], zooms[1] = zooms[0] / f, zooms[1] / f
    image.header.set_zooms(zooms)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    image.header["descrip"] = f"medgen restored {units}".encode("ascii")
    if values.dtype.kind in "iu":
        image.header.set_slope_inter(1.0, 0.0)
    image.update_header()
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def _dicom_geometry(files: list[Path], meta: dict, spacing: tuple[float, float], f: int) -> None:
    """The source's orientation and slice positions, each moved to the new first pixel's centre."""
    orientation, positions = meta.get("orientation"), meta.get("positions")
    if orientation is None or positions is None or len(positions) != len(files):
        return  # no geometry in the source (a lone image): the writer's axial default stays
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    shift = (1.0 - f) / (2.0 * f) * (spacing[1] * row_dir + spacing[0] * col_dir)
    normal = np.cross(row_dir, col_dir)
    for path, position in zip(files, positions):
        ds = pydicom.dcmread(path)
        new = np.asarray(position, float) + shift
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in new]
        ds.SliceLocation = float(np.dot(normal, new))
        ds.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgen restore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site_dir", type=Path, help="the site folder (images/, dataset.toml) to restore")
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished restore-diffusion/blind-denoise run")
    parser.add_argument("--site", help="the site these scans come from (the model's site id); "
                        "default: the node's site, with --state")
    parser.add_argument("--state", type=Path, help="this hospital's node folder (medgen-client --state): "
                        "the site and the training data's dataset.toml come from its node-config.toml")
    parser.add_argument("--out", type=Path, required=True, help="new output folder (must not exist)")
    parser.add_argument("--series", help="restore only the records whose key starts with this")
    parser.add_argument("--task", choices=RESTORABLE, help="what you expect the run to do (checked)")
    parser.add_argument("--trained-units", help="the run's training units when its config names no data")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if not args.site_dir.is_dir():
            raise RestoreError(f"input {args.site_dir} does not exist or is not a site folder")
        if args.out.exists():
            raise RestoreError(f"{args.out} exists; medgen restore never overwrites: choose a new --out")
        site, trained_data = node_training(args.state) if args.state is not None else (args.site, None)
        if args.site is not None and args.site != site:
            raise RestoreError(f"--site {args.site}, but {args.state}/node-config.toml is site {site}; "
                               "leave --site out or pass the node's own --state")
        if site is None:
            raise RestoreError("--site or --state is required: which site these scans come from")
        restorer = Restorer(args.run_dir, site, args.task, args.trained_units, trained_data=trained_data)
        written = restore_site(args.site_dir, args.out, restorer, args.series)
        print(f"restored ({restorer.task}) {len(written)} record(s) of site {site} into {args.out}")
    except (RestoreError, ValueError) as err:
        print(f"medgen restore: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
