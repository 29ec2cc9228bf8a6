"""Time to ingest 1,000 DICOM slices, cold and from the tensor cache (issue 7).

A site of 10 subjects x 100 axial slices (real MNI T1 voxels, 99x117 px, written as DICOM
series with shuffled file names) is loaded by ``load_site`` at image size 64: cold (scan,
group, sort, decode, normalise, resize, write the cache) and warm (cache hit). Run by hand:

    .venv/bin/python -m bench.dicom_ingest     -> bench/results/dicom_ingest.json
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from medgen.data.dicom import DicomSeriesReader
from medgen.data.readers import NiftiReader, PngReader
from medgen.data.site_data import load_site
from medgen.sim.dicom_export import mni_t1_volume, write_series

SUBJECTS, SLICES, IMAGE_SIZE = 10, 100, 64


def build_site(root: Path) -> tuple[int, list[int]]:
    mni, _ = mni_t1_volume(stride=1)
    volume = mni[::2, ::2, 40:40 + SLICES]
    for k in range(SUBJECTS):
        write_series(volume + k, (2.0, 2.0, 1.0), root / "images" / f"sub-{k:02d}", modality="MR",
                     patient_id=f"BENCH-{k}", seed=100 + k)
    files = sum(1 for p in (root / "images").rglob("*") if p.is_file())
    return files, [int(n) for n in volume.shape[:2]]


def main() -> None:
    torch.set_num_threads(1)
    readers = lambda: [NiftiReader(), PngReader(), DicomSeriesReader()]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="medgen-bench-dicom-") as tmp:
        site = Path(tmp) / "site"
        files, slice_pixels = build_site(site)
        cold, warm = [], []
        for _ in range(2):
            cache = Path(tmp) / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            start = time.perf_counter()
            data = load_site(site, IMAGE_SIZE, cache_dir=cache, readers=readers())
            cold.append(time.perf_counter() - start)
            for _ in range(3):
                start = time.perf_counter()
                again = load_site(site, IMAGE_SIZE, cache_dir=cache, readers=readers())
                warm.append(time.perf_counter() - start)
            assert torch.equal(data.images, again.images)
        write_result("dicom_ingest", {
            "slices": int(data.images.shape[0]), "files": files, "subjects": SUBJECTS,
            "source_slice_pixels": slice_pixels,
            "image_size": IMAGE_SIZE,
            "cold_s": {"median": statistics.median(cold), "runs": cold},
            "cache_s": {"median": statistics.median(warm), "runs": warm},
            "cold_slices_per_s": data.images.shape[0] / statistics.median(cold),
            "note": "cold = scan+group+sort+decode+normalise+resize+cache write; cache = key over "
                    "every file's bytes + torch.load. One CPU thread.",
        })


if __name__ == "__main__":
    main()
