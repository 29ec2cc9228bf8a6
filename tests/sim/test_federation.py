"""Builds of the simulated federation: layout, determinism, disjoint seeds, refusal."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.federation import FederationExistsError, Manifest, build_federation


@pytest.fixture
def TINY(tiny_config):
    return tiny_config


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_layout_shapes_and_dtypes(built):
    root = built.root
    for site, bits_dtype in (("A", np.uint16), ("B", np.uint8), ("C", np.uint16), ("D", np.uint16)):
        images = sorted((root / "sites" / site / "images").glob("*.nii.gz"))
        labels = sorted((root / "sites" / site / "labels").glob("*.nii.gz"))
        assert [p.name for p in images] == [p.name for p in labels] and len(images) == 2
        image, label = _load(images[0]), _load(labels[0])
        assert image.shape == label.shape == (32, 32)
        assert image.dtype == bits_dtype and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1, 2, 3} and image.max() > 0
        bits = built.data["sites"][site]["bits"]
        assert image.max() < 2 ** bits
    assert len(list((root / "public" / "labels").glob("*.nii.gz"))) == 3
    assert not (root / "public" / "images").exists()  # the public bank is labels only
    for split, count in (("fit", 2), ("test", 2)):
        for site in "ABCD":
            for kind in ("images", "labels", "clean"):
                assert len(list((root / "heldout" / split / site / kind).glob("*.nii.gz"))) == count
    clean = _load(root / "heldout/test/B/clean/ht-0000.nii.gz")
    assert clean.dtype == np.float32 and clean.shape == (32, 32)


def test_clean_shares_the_units_of_its_scan(built):
    # the clean rendering must be directly comparable with its noisy scan
    for site in "ABCD":
        base = built.root / "heldout/test" / site
        scan = _load(base / "images/ht-0001.nii.gz").astype(float)
        clean = _load(base / "clean/ht-0001.nii.gz").astype(float)
        brain = _load(base / "labels/ht-0001.nii.gz") > 0
        assert np.corrcoef(scan[brain], clean[brain])[0, 1] > 0.5, site
        assert 0.6 < scan[brain].mean() / clean[brain].mean() < 1.5, site


def test_heldout_subjects_are_paired_across_sites(built):
    labels = [_load(built.root / f"heldout/test/{s}/labels/ht-0000.nii.gz") for s in "ABCD"]
    for other in labels[1:]:
        np.testing.assert_array_equal(labels[0], other)
    images = [_load(built.root / f"heldout/test/{s}/images/ht-0000.nii.gz").astype(float) for s in "AC"]
    assert np.corrcoef(images[0].ravel(), images[1].ravel())[0, 1] < 0.9  # different contrast


def test_seeds_are_disjoint_between_sites_public_and_heldout(built):
    groups = built.data["subjects"]
    assert set(groups) == {"sites/A", "sites/B", "sites/C", "sites/D", "public", "heldout/fit", "heldout/test"}
    seeds = [r["deformation_seed"] for records in groups.values() for r in records]
    assert len(seeds) == len(set(seeds)) == 4 * 2 + 3 + 2 + 2
    # and the anatomies really differ: no two subjects share a label map
    maps = [p.read_bytes() for p in built.root.rglob("labels/*.nii.gz") if "heldout" not in str(p)]
    maps += [p.read_bytes() for p in built.root.glob("heldout/*/A/labels/*.nii.gz")]
    assert len(maps) == len(set(maps)) == len(seeds)


def test_same_seed_gives_byte_identical_files(built, TINY, tmp_path):
    again = build_federation(TINY, tmp_path / "again")
    assert _files(again.root) == _files(built.root)
    assert again.content_hash == built.content_hash
    other = build_federation(SimConfig(**{**TINY.to_dict(), "seed": 4}), tmp_path / "other")
    assert other.content_hash != built.content_hash


def test_rebuild_reuses_and_refuses_a_different_build(built, TINY, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for rel, data in _files(built.root).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    marker = root / "sites/A/images/A-0000.nii.gz"
    mtime = marker.stat().st_mtime_ns
    assert build_federation(TINY, root).content_hash == built.content_hash
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt
    different = SimConfig(**{**TINY.to_dict(), "subjects_per_site": 3})
    with pytest.raises(FederationExistsError, match="overwrite"):
        build_federation(different, root)
    assert marker.stat().st_mtime_ns == mtime  # the refused build touched nothing
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hospital data")
    with pytest.raises(FederationExistsError, match="not empty"):
        build_federation(TINY, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "hospital data"


def test_manifest_records_config_physics_and_counts(built, TINY):
    data = json.loads((built.root / "manifest.json").read_text())
    assert SimConfig.from_dict(data["config"]) == TINY
    assert data["counts"]["sites/A"] == 2 and data["counts"]["public"] == 3
    assert data["sites"]["C"]["gibbs"] > 0 and data["sites"]["A"]["gibbs"] == 0
    assert Manifest.load(built.root).config_hash == TINY.config_hash()


def test_bad_config_names_the_field():
    with pytest.raises(SimConfigError, match="image_size"):
        SimConfig(image_size=16)
    with pytest.raises(SimConfigError, match="sites"):
        SimConfig(sites="A,A")
    with pytest.raises(SimConfigError, match="severity"):
        SimConfig(sites="A,B", severity={"C": 0.5})


def test_site_count_and_quantity_skew():
    config = SimConfig(sites="6", subjects_per_site=100, quantity_skew=0.5)
    assert config.site_names == ("A", "B", "C", "D", "E", "F")
    counts = list(config.site_counts().values())
    assert counts[0] == 100 and all(a > b for a, b in zip(counts, counts[1:]))
    physics = config.physics()
    assert physics["E"].kind == "B" and physics["E"].severity == pytest.approx(0.5)


@pytest.mark.slow
def test_worker_processes_do_not_change_the_files(built, TINY, tmp_path):
    parallel = build_federation(TINY, tmp_path / "parallel", workers=2)
    assert parallel.content_hash == built.content_hash
    assert _files(parallel.root) == _files(built.root)
