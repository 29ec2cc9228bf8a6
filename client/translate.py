"""`medgen translate`: a hospital translates its own site folder to another site's style, locally.

    medgen-client translate --run-dir RUN --public PUBLIC_DIR \\
        --source-site A --target-site C --out OUT_DIR SITE_DIR
    (also: medgen translate ..., python -m medgen.client.translate ...)

RUN is a trained run of a recipe that declares the Translation capability
(models/capabilities.py; bridge-translate does): config.toml + checkpoint.pt as written by
`medgen-server` or `python -m bench.translation train`. PUBLIC_DIR holds the public label
maps the federation shares (a site's style may be measured on the generator's samples of
them: no private data). SITE_DIR is a site folder (docs/data-layout.md): images/ and its
dataset.toml, read exactly as training reads it, through medgen.data (the one listing and
reading of data/site_records.py: links not followed, the manifest's modality filter, every
data check verdict; a skipped record is named on stderr and not translated).

Intensities never pass through a scaling of this module's own: each record is mapped to
[-1, 1] by the manifest's intensity map for that record (CT: the fixed HU window,
identical at every site; MR: the volume's percentiles), translated, and mapped back by
the same map's exact inverse (data/intensity.py), so the output is in the input's
physical units (HU for CT; outside the window a value comes back as the window's edge).
A constant slice (dropped by training too) is passed through unchanged.

Another modality out: a recipe whose translation writes another modality declares it as
data (``translated_output`` -> ``TranslatedOutput``, models/capabilities.py: the output's
modality, units and the fixed window its [-1, 1] stands for, and the modality it reads;
da-gan: MR in, CT in HU out). Then the input site must be of the modality it reads, every
slice (constant ones too: a copy would be in the input's units) is translated and mapped
to physical values by that window's inverse (a ``WindowMap``), and the output is written
as that modality: OUT/dataset.toml declares it (units, window normalisation), NIfTI in
int16 HU for HU, DICOM with Modality and SOP class of that modality and RescaleType HU.
No branch names a recipe: the declaration is the recipe's, the writing is this module's.

OUT_DIR is written as a site folder of its own, built in a staging folder and renamed into
place at the end (never half-written, never overwritten; it must not exist):
- OUT/dataset.toml: the manifest the input was read with (a declared output: its
  modality and intensity in place of the input's);
- OUT/images/<subject>.nii.gz for a NIfTI/PNG record: HU as int16 with identity scaling,
  other units float32 (data/nifti_io.py); a NIfTI input's geometry is kept whole (its
  affine, qform and sform with their codes, voxel sizes and units; no free-text field
  such as descrip, which may name a patient), a PNG's pixel spacing is unknown (1 mm);
- OUT/images/<subject>/slice_NNNN.dcm for a DICOM series: one new series
  (data/dicom_writer.py) whose Rescale Slope/Intercept make pydicom's modality LUT return
  the physical values (HU, RescaleType HU, the manifest's window as display window),
  ImageType DERIVED\\SECONDARY, "translated to <site>" in the Series Description, no
  patient identifier copied; the source series' ImageOrientationPatient and each slice's
  ImagePositionPatient are kept, so the translation overlays the original in a viewer.
Input files are only read. Geometry: slices are padded to a square in physical extent and
resized to the run's image size exactly as in training, then brought back to the input's
rows x columns.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
from pathlib import Path
from dataclasses import replace
from typing import Callable

import nibabel
import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from medgen.config import RunConfig
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.intensity import IntensityMap, WindowMap
from medgen.data.manifest import DatasetManifest, IntensityPolicy
from medgen.data.nifti_io import hu_to_int16, write_physical_nifti
from medgen.data.preprocess import normalise, square_resize
from medgen.data.public_bank_loader import load_public_bank
from medgen.data.readers import default_readers
from medgen.data.site_data import site_manifest
from medgen.data.site_folder import SiteFolder, open_regular
from medgen.data.site_records import SiteReading, SiteRecord
from medgen.data.staging import staged_folder
from medgen.models.capabilities import TranslatedOutput, Translation, declares, translation_output
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import load_checkpoint

ImageFn = Callable[[torch.Tensor], torch.Tensor]  # [N,1,size,size] in [-1,1] -> same


class TranslateError(ValueError):
    """An input cannot be translated; the message names it and says what to do."""


class Translator:
    """The trained model and the two site styles, bound to one source -> target."""

    def __init__(self, run_dir: Path, public_dir: Path, source: str, target: str, seed: int = 0):
        run_dir = Path(run_dir)
        config_path = run_dir / "config.toml"
        if not config_path.is_file():
            raise TranslateError(f"{config_path} does not exist: --run-dir must be a trained run")
        config = RunConfig.from_toml(config_path)
        self.recipe = build_recipe(config)
        if not declares(self.recipe, Translation):  # a declared capability, not a recipe class
            raise TranslateError(f"{run_dir} trained recipe '{config.recipe}', which does not declare "
                                 "the Translation capability (e.g. bridge-translate does)")
        for name, site in (("--source-site", source), ("--target-site", target)):
            if site not in config.site_names:
                raise TranslateError(f"{name} {site} is not a site of this run: {', '.join(config.site_names)}")
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None:
            raise TranslateError(f"{run_dir}/checkpoint.pt does not exist: train the run first")
        self.model = self.recipe.build()
        self.model.load_state_dict({**self.model.state_dict(), **checkpoint.shared_state})
        self.model.eval()
        self.size = config.image_size
        public = load_public_bank(public_dir, self.size)
        names = list(config.site_names)
        self.source_style = self.recipe.site_style(self.model, public, names.index(source), seed)
        self.target_style = self.recipe.site_style(self.model, public, names.index(target), seed)
        self.target = target
        self.output = translation_output(self.recipe, names.index(target))  # None: the input's units

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.recipe.translate_images(self.model, images, self.source_style, self.target_style)


def translate_record(record: SiteRecord, fn: ImageFn, size: int,
                     output: IntensityMap | None = None) -> np.ndarray:
    """One record's (H, W, S) physical values -> the translated physical values, same shape.

    Forward is the record's own intensity map (the manifest's). ``output`` None: the same
    map's inverse, constant slices returned as they are. ``output`` given (a declared other
    modality): every slice translated, mapped back by ``output``'s inverse."""
    volume, scaling = record.volume, record.scaling
    imap = scaling.intensity
    if imap is None:
        raise TranslateError(f"{record.source}: no intensity map (read without a manifest)")
    array = np.asarray(volume.array, np.float64)
    out = array.copy() if output is None else np.empty_like(array)
    keep = scaling.keep if output is None else np.ones(array.shape[-1], bool)
    if keep.any():
        x = normalise(array, scaling) if output is None else imap.forward(array)
        x = square_resize(x, size, volume.spacing, "image")[:, None]
        y = fn(x).float().cpu()
        y = _unsquare(y, array.shape[:2], volume.spacing)  # [S_kept, H, W] in [-1, 1]
        out[..., keep] = np.moveaxis((output or imap).inverse(y.numpy()), 0, -1)
    return out


def output_manifest(manifest: DatasetManifest, output: TranslatedOutput | None,
                    site_dir: Path) -> DatasetManifest:
    """The manifest of the translated folder: the input's, or (a declared output) the
    input's with the output's modality and fixed window, checked like any dataset.toml."""
    if output is None:
        return manifest
    if manifest.modality != output.reads:
        raise TranslateError(f"{site_dir}: its dataset.toml says modality {manifest.modality}, but "
                             f"this run translates {output.reads} to {output.modality}; give a "
                             f"{output.reads} site folder")
    intensity = IntensityPolicy(units=output.units, normalisation="window", window=output.window)
    declared = replace(manifest, modality=output.modality, intensity=intensity, paired=None)
    return DatasetManifest.from_tables(declared.to_tables(), ())  # the data model's checks


def _unsquare(images: torch.Tensor, shape: tuple[int, int], spacing) -> torch.Tensor:
    """Inverse of square_resize for images: resize to the padded square, crop."""
    height, width = shape
    row_mm, col_mm = (spacing[0], spacing[1]) if spacing and min(spacing[:2]) > 0 else (1.0, 1.0)
    side_mm = max(height * row_mm, width * col_mm)
    target_h, target_w = max(height, round(side_mm / row_mm)), max(width, round(side_mm / col_mm))
    top, left = (target_h - height) // 2, (target_w - width) // 2
    big = images.float()
    if big.shape[-2:] != (target_h, target_w):
        big = F.interpolate(big, size=(target_h, target_w), mode="bilinear", align_corners=False)
    return big[:, 0, top:top + height, left:left + width]


def read_site_records(site_dir: Path) -> tuple[DatasetManifest, list[SiteRecord], list[str]]:
    """The site's manifest, its usable records and the skip reasons: the training reading."""
    site_dir = Path(site_dir)
    if not (site_dir / "images").is_dir():
        raise TranslateError(f"{site_dir}: not a site folder (no images/); see docs/data-layout.md")
    manifest = site_manifest(site_dir)
    folder = SiteFolder.scan(site_dir, ("images",))  # labels are not needed to translate
    reading = SiteReading(folder, default_readers(), need_labels=False,
                          manifest=manifest.with_labels(None))
    records = list(reading.records())
    return manifest, records, [s.reason for s in reading.skipped]


def translate_site(site_dir: Path, out: Path, fn: ImageFn, size: int, target: str,
                   output: TranslatedOutput | None = None) -> list[Path]:
    """Translate every usable record of ``site_dir`` into the new site folder ``out``;
    ``output``: what the translation declares it writes (None: the input's modality)."""
    site_dir, out = Path(site_dir), Path(out)
    if out.exists():
        raise TranslateError(f"{out} exists; medgen translate never overwrites: choose a new --out")
    if out.resolve() == site_dir.resolve() or site_dir.resolve() in out.resolve().parents:
        raise TranslateError(f"--out {out} is inside the input site {site_dir}; choose another folder")
    manifest, records, skipped = read_site_records(site_dir)
    manifest = output_manifest(manifest, output, site_dir)
    window_map = None if output is None else WindowMap(*output.window, units=output.units)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not records:
        raise TranslateError(f"{site_dir}: no usable image to translate (run `medgen-client data "
                             "check` on it)")
    units = manifest.intensity.units
    window = manifest.intensity.window if manifest.intensity.normalisation == "window" else None
    written = []
    with staged_folder(out) as staging:
        manifest.write(staging)
        for record in records:
            physical = translate_record(record, fn, size, window_map)
            spacing = record.volume.spacing or (1.0, 1.0, 1.0)
            name = record.key.replace("#", "_")
            if record.volume.meta.get("format") == "dicom":
                seed = int(hashlib.sha256(f"{target}/{record.source}".encode()).hexdigest()[:12], 16)
                files = write_physical_dicom(staging / "images" / name, physical, spacing,
                                             modality=manifest.modality, units=units, seed=seed,
                                             window=window, description=f"medgen (translated to {target})")
                _keep_dicom_geometry(files, record.volume.meta)
                written.append(out / "images" / name)
            else:
                path = staging / "images" / f"{name}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                if record.volume.meta.get("format") == "nifti":
                    _write_nifti_like(path, _squeeze(physical), units, record.volume.source)
                else:
                    write_physical_nifti(path, _squeeze(physical), spacing, units)
                written.append(out / "images" / path.name)
    return written


def _nifti_header(source: Path) -> nibabel.Nifti1Header:
    """The source file's header (NIfTI-1 or -2), read like the site reader reads: no link
    followed, nothing written."""
    with open_regular(source) as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    for kind in (nibabel.Nifti1Header, nibabel.Nifti2Header):
        try:
            return kind.from_fileobj(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - not this NIfTI version: try the next
            continue
    raise TranslateError(f"{source}: its NIfTI header cannot be read again to copy its geometry")


def _write_nifti_like(path: Path, physical: np.ndarray, units: str, source: Path) -> None:
    """``physical`` as NIfTI with the source's geometry (affine, qform/sform and codes, voxel
    sizes, units); values as write_physical_nifti stores them, gzip without a timestamp."""
    header = _nifti_header(Path(source))
    values = hu_to_int16(physical) if units == "HU" else np.asarray(physical, np.float32)
    if values.shape != tuple(header.get_data_shape()):
        raise TranslateError(f"{source}: translated shape {values.shape} differs from the "
                             f"file's {tuple(header.get_data_shape())}")
    image = nibabel.Nifti1Image(values, None)
    out = image.header
    out.set_qform(header.get_qform(), code=int(header["qform_code"]))
    out.set_sform(header.get_sform(), code=int(header["sform_code"]))
    out.set_zooms(header.get_zooms()[:values.ndim])
    out.set_xyzt_units(*header.get_xyzt_units())
    out["descrip"] = f"medgen {units}".encode("ascii")
    if values.dtype.kind in "iu":
        out.set_slope_inter(1.0, 0.0)
    image.update_header()
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def _keep_dicom_geometry(files: list[Path], meta: dict) -> None:
    """Give the written series the source's orientation and per-slice positions."""
    orientation, positions = meta.get("orientation"), meta.get("positions")
    if orientation is None or positions is None or len(positions) != len(files):
        return  # no geometry in the source (a lone image): the writer's axial default stays
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    for path, position in zip(files, positions):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.SliceLocation = float(np.dot(normal, position))
        ds.save_as(path, enforce_file_format=True)


def _squeeze(physical: np.ndarray) -> np.ndarray:
    return physical[..., 0] if physical.ndim == 3 and physical.shape[-1] == 1 else physical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgen translate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path, help="the site folder (images/, dataset.toml) to translate")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--public", type=Path, required=True, help="public label maps (public/ or public/labels)")
    parser.add_argument("--source-site", required=True, help="the site these scans come from")
    parser.add_argument("--target-site", required=True, help="the site whose style to translate to")
    parser.add_argument("--out", type=Path, required=True, help="new output folder (must not exist)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if not args.site.is_dir():
            raise TranslateError(f"input {args.site} does not exist or is not a site folder")
        if args.out.exists():
            raise TranslateError(f"{args.out} exists; medgen translate never overwrites: choose a new --out")
        translator = Translator(args.run_dir, args.public, args.source_site, args.target_site)
        written = translate_site(args.site, args.out, translator, translator.size, args.target_site,
                                 translator.output)
        print(f"translated {len(written)} record(s) from site {args.source_site} to "
              f"{args.target_site} into {args.out}")
    except (TranslateError, ValueError) as err:
        print(f"medgen translate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
