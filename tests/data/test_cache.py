"""The tensor cache: a hit returns identical tensors without reading; any change misses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from medgen.data.cache import TensorCache, fingerprint
from medgen.data.readers import NiftiReader, PngReader
from medgen.data.site_data import load_heldout, load_site

torch.set_num_threads(1)


class CountingNifti(NiftiReader):
    """The NIfTI reader, counting reads (a cache hit must read nothing)."""

    def __init__(self):
        self.reads = 0

    def read(self, path: Path):
        self.reads += 1
        return super().read(path)


def site_with_bad_file(root: Path, files) -> Path:
    for index in range(3):
        image, labels = files.phantom(16, seed=index)
        files.write_nifti(root / "images" / f"p{index}.nii.gz", image)
        files.write_nifti(root / "labels" / f"p{index}.nii.gz", labels)
    (root / "images" / "broken.nii.gz").write_bytes(b"\x01" * 64)
    return root


def test_fingerprint_tracks_content_names_params_not_location(tmp_path, files):
    site = site_with_bad_file(tmp_path / "a", files)
    params = {"image_size": 16}
    key = fingerprint(site, ("images", "labels"), params)
    copy = tmp_path / "elsewhere"
    shutil.copytree(site, copy)
    assert fingerprint(copy, ("images", "labels"), params) == key  # relative paths only
    assert fingerprint(site, ("images", "labels"), {"image_size": 32}) != key
    # same size, one byte changed, in the BAD file: whether it is skipped depends on it
    data = bytearray((copy / "images" / "broken.nii.gz").read_bytes())
    data[10] ^= 1
    (copy / "images" / "broken.nii.gz").write_bytes(bytes(data))
    assert fingerprint(copy, ("images", "labels"), params) != key
    shutil.copytree(site, tmp_path / "renamed")
    (tmp_path / "renamed" / "labels" / "p2.nii.gz").rename(tmp_path / "renamed" / "labels" / "p9.nii.gz")
    assert fingerprint(tmp_path / "renamed", ("images", "labels"), params) != key


def test_cache_hit_is_identical_reads_nothing_and_keeps_skipped(tmp_path, files):
    site = site_with_bad_file(tmp_path / "site", files)
    before = files.snapshot(site)
    reader = CountingNifti()
    cold = load_site(site, 16, cache_dir=tmp_path / "cache", readers=[reader, PngReader()])
    reads_cold = reader.reads
    assert reads_cold >= 7 and len(list((tmp_path / "cache").iterdir())) == 1
    warm = load_site(site, 16, cache_dir=tmp_path / "cache", readers=[reader, PngReader()])
    assert reader.reads == reads_cold  # served from the cache
    assert torch.equal(cold.images, warm.images) and torch.equal(cold.labels, warm.labels)
    assert torch.equal(cold.patient_index, warm.patient_index)
    assert warm.num_patients == cold.num_patients == 3 and warm.fingerprint == cold.fingerprint
    assert warm.skipped == cold.skipped and warm.skipped[0].path.name == "broken.nii.gz"
    assert files.snapshot(site) == before
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_changed_file_or_parameter_misses(tmp_path, files):
    site = site_with_bad_file(tmp_path / "site", files)
    reader = CountingNifti()
    readers = [reader, PngReader()]
    first = load_site(site, 16, cache_dir=tmp_path / "cache", readers=readers)
    reads = reader.reads
    other_size = load_site(site, 32, cache_dir=tmp_path / "cache", readers=readers)
    assert reader.reads > reads and other_size.images.shape[-1] == 32
    reads = reader.reads
    files.write_nifti(site / "images" / "p0.nii.gz", files.phantom(16, seed=42)[0])
    changed = load_site(site, 16, cache_dir=tmp_path / "cache", readers=readers)
    assert reader.reads > reads
    assert changed.fingerprint != first.fingerprint
    assert not torch.equal(changed.images, first.images)


def test_unreadable_cache_entry_is_rebuilt(tmp_path, files):
    site = site_with_bad_file(tmp_path / "site", files)
    first = load_site(site, 16, cache_dir=tmp_path / "cache")
    entry = TensorCache(tmp_path / "cache").path_for(first.fingerprint)
    entry.write_bytes(b"torn")
    again = load_site(site, 16, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, first.images)
    assert TensorCache(tmp_path / "cache").get(first.fingerprint) is not None


def test_tensor_cache_rejects_entry_of_another_key(tmp_path):
    cache = TensorCache(tmp_path)
    cache.put("a" * 64, {"x": torch.arange(3)})
    assert torch.equal(cache.get("a" * 64)["x"], torch.arange(3))
    # a different key sharing the 32-character file prefix must not be served that entry
    assert cache.get("a" * 32 + "b" * 32) is None
    assert cache.get("c" * 64) is None


def test_heldout_cache_hit_identical(tmp_path, files):
    root = tmp_path / "data"
    for subject in range(2):
        clean, labels = files.phantom(16, seed=subject)
        noisy = clean + np.random.default_rng(subject).normal(0, 40, clean.shape)
        for folder, array in (("images", noisy.astype(np.float32)), ("clean", clean.astype(np.float32)),
                              ("labels", labels)):
            files.write_nifti(root / "heldout" / "fit" / "A" / folder / f"s{subject}.nii.gz", array)
    cold = load_heldout(root, "fit", 16, cache_dir=tmp_path / "cache")["A"]
    warm = load_heldout(root, "fit", 16, cache_dir=tmp_path / "cache")["A"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for name in ("images", "clean", "labels"):
        assert torch.equal(getattr(cold, name), getattr(warm, name))
    assert cold.subjects == warm.subjects == ("s0", "s1")
