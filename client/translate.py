"""`medgen translate`: a hospital translates its own scans to another site's style, locally.

    python -m medgen.client.translate --run-dir RUN --public PUBLIC_DIR \\
        --source-site A --target-site C --out OUT_DIR INPUT [INPUT ...]

RUN is a trained bridge-translate run (config.toml + checkpoint.pt, as written by
`medgen-server` or `python -m bench.translation train`); PUBLIC_DIR the public label maps
the federation shares (the site styles are measured on the generator's samples of them:
no private data). INPUT: NIfTI files (.nii, .nii.gz), single-frame DICOM files (.dcm), or
folders of them. Each output keeps its input's format, file name, geometry and header:
- NIfTI: same affine, same header (data type set to float32), same shape;
- DICOM: same header except pixel data, a new SOP Instance UID, one new Series Instance
  UID per input series, and "(translated to <site>)" appended to the Series Description.
Intensities: the translated image on the [-1, 1] scale is mapped back onto the input
slice's own robust range (0.5th..99.5th percentile), so values stay in scanner-like units.
Inputs are only read; an existing output is never overwritten (choose a new --out).
Every slice goes through the same preprocessing the model was trained with
(client/site_data.py: robust scaling, padding to a square in physical extent, resizing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgen.data.site_data import load_public_bank, normalise, robust_scaling, square_resize
from medgen.config import RunConfig
from medgen.models.capabilities import Translation, declares
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import load_checkpoint

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class TranslateError(ValueError):
    """An input cannot be translated; the message names it and says what to do."""


class Translator:
    """The trained model, its styles and the preprocessing, bound to one source -> target."""

    def __init__(self, run_dir: Path, public_dir: Path, source: str, target: str, seed: int = 0):
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

    def translate_volume(self, array: np.ndarray, spacing: tuple[float, float, float] | None) -> np.ndarray:
        """(H, W) or (H, W, S) scanner values -> translated float32 of the same shape."""
        squeeze = array.ndim == 2
        volume = array[..., None] if squeeze else array
        if volume.ndim != 3:
            raise TranslateError(f"expected a 2D image or a 3D stack of axial slices, got shape {array.shape}")
        volume = volume.astype(np.float64)
        scaling = robust_scaling(volume)
        out = volume.astype(np.float32).copy()  # constant slices are passed through as they are
        if scaling.keep.any():
            x = square_resize(normalise(volume, scaling), self.size, spacing, "image")[:, None]
            with torch.no_grad():
                y = self.recipe.translate_images(self.model, x, self.source_style, self.target_style)
            y = _unsquare(y, volume.shape[:2], spacing)  # [S_kept, H, W] in [-1, 1]
            low, high = scaling.low[scaling.keep], scaling.high[scaling.keep]
            values = low[:, None, None] + (y.numpy().astype(np.float64) + 1.0) / 2.0 * (high - low)[:, None, None]
            out[..., scaling.keep] = np.moveaxis(values, 0, -1).astype(np.float32)
        return out[..., 0] if squeeze else out


def _unsquare(images: torch.Tensor, shape: tuple[int, int], spacing) -> torch.Tensor:
    """Inverse of site_data.square_resize for images: resize to the padded square, crop."""
    height, width = shape
    row_mm, col_mm = (spacing[0], spacing[1]) if spacing and min(spacing[:2]) > 0 else (1.0, 1.0)
    side_mm = max(height * row_mm, width * col_mm)
    target_h, target_w = max(height, round(side_mm / row_mm)), max(width, round(side_mm / col_mm))
    top, left = (target_h - height) // 2, (target_w - width) // 2
    big = F.interpolate(images.float(), size=(target_h, target_w), mode="bilinear", align_corners=False)
    return big[:, 0, top:top + height, left:left + width]


# -- formats -------------------------------------------------------------------------
def translate_nifti(translator: Translator, path: Path, out: Path) -> None:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asarray(image.dataobj)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(image.header.get_zooms()))
    result = translator.translate_volume(array, zooms[:3]).reshape(np.asarray(image.dataobj).shape)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(type(image)(result.astype(np.float32), image.affine, header), str(out))


def translate_dicom(translator: Translator, path: Path, out: Path, series_uids: dict[str, str]) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.dcmread(str(path))
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise TranslateError(f"{path}: multi-frame DICOM is not supported by `medgen translate` yet; "
                             "export single-frame slices")
    stored = ds.pixel_array
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = stored.astype(np.float64) * slope + intercept
    spacing = tuple(float(v) for v in getattr(ds, "PixelSpacing", (1.0, 1.0))) + (1.0,)
    result = translator.translate_volume(values, spacing)
    info = np.iinfo(stored.dtype) if np.issubdtype(stored.dtype, np.integer) else None
    back = np.rint((result - intercept) / slope)
    if info is not None:
        back = np.clip(back, info.min, info.max)
    ds.PixelData = back.astype(stored.dtype).tobytes()
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    series = str(getattr(ds, "SeriesInstanceUID", ""))
    ds.SeriesInstanceUID = series_uids.setdefault(series, generate_uid())
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = f"{getattr(ds, 'SeriesDescription', '')} (translated to {translator.target})".strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out))


def _inputs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output folder) for every input file, sorted."""
    found = []
    for path in paths:
        if path.is_dir():
            found += [(p, p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise TranslateError(f"input {path} does not exist")
    return found


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".dcm"):
        return "dicom"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgen translate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="NIfTI/DICOM files or folders")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--public", type=Path, required=True, help="public label maps (public/ or public/labels)")
    parser.add_argument("--source-site", required=True, help="the site these scans come from")
    parser.add_argument("--target-site", required=True, help="the site whose style to translate to")
    parser.add_argument("--out", type=Path, required=True, help="output folder (never the input)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        files = _inputs(args.inputs)
        out_root = args.out.resolve()
        for path, _ in files:
            if path.resolve().parent == out_root or out_root in path.resolve().parents:
                raise TranslateError(f"--out {args.out} contains the input {path}; choose another folder")
        translator = Translator(args.run_dir, args.public, args.source_site, args.target_site)
        series_uids: dict[str, str] = {}
        done = skipped = 0
        for path, rel in files:
            kind, dest = _kind(path), args.out / rel
            if kind is None:
                print(f"skipped {path}: not NIfTI (.nii, .nii.gz) or DICOM (.dcm)", file=sys.stderr)
                skipped += 1
                continue
            if dest.exists():
                raise TranslateError(f"{dest} exists; medgen translate never overwrites: choose a new --out")
            if kind == "nifti":
                translate_nifti(translator, path, dest)
            else:
                translate_dicom(translator, path, dest, series_uids)
            done += 1
        print(f"translated {done} file(s) from site {args.source_site} to {args.target_site} into "
              f"{args.out}; skipped {skipped}")
    except TranslateError as err:
        print(f"medgen translate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
