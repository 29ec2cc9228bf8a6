"""The head-CT federation: layout, one CT window, determinism, classes, paired held-out."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.data import load_manifest
from medgen.data.intensity import intensity_map
from medgen.sim.cli import main as sim_main
from medgen.sim.ct_physics import CT_PRESETS
from medgen.sim.federation import FederationExistsError
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import HeadManifest, build_head_federation
from medgen.sim.head_tissues import HEAD_CLASSES

SITES = ("A", "B", "C", "D", "M")
TINY = HeadSimConfig(seed=5, sites=",".join(SITES), subjects_per_site=2, public_size=2,
                     heldout_fit=1, heldout_test=2, image_size=32)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return build_head_federation(TINY, tmp_path_factory.mktemp("head") / "data")


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_layout_dtypes_and_manifest(head):
    root = head.root
    for site in SITES:
        images = sorted((root / "sites" / site / "images").glob("*.nii.gz"))
        labels = sorted((root / "sites" / site / "labels").glob("*.nii.gz"))
        assert [p.name for p in images] == [p.name for p in labels] == [f"{site}-0000.nii.gz",
                                                                          f"{site}-0001.nii.gz"]
        image, label = _load(images[0]), _load(labels[0])
        assert image.shape == label.shape == (32, 32) and label.dtype == np.uint8
        assert image.dtype == (np.uint16 if site == "M" else np.int16)
    assert len(list((root / "public" / "labels").glob("*.nii.gz"))) == 2
    assert not (root / "public" / "images").exists()
    data = json.loads((root / "manifest.json").read_text())
    assert data["federation"] == "head-ct" and data["classes"] == list(HEAD_CLASSES)
    assert data["site_modalities"] == {"A": "CT", "B": "CT", "C": "CT", "D": "CT", "M": "MR"}
    assert HeadManifest.load(root).config == TINY


def test_ct_images_are_honest_int16_hu(head):
    path = head.root / "sites" / "A" / "images" / "A-0000.nii.gz"
    image = nib.load(str(path))
    assert image.dataobj.slope == 1.0 and image.dataobj.inter == 0.0
    assert np.allclose(image.header.get_zooms(), (7.5, 7.5))
    hu, labels = _load(path), _load(head.root / "sites" / "A" / "labels" / "A-0000.nii.gz")
    air = labels == HEAD_CLASSES.index("air")
    assert abs(np.median(hu[air]) + 1000) < 30  # air reads -1000 HU
    assert np.median(hu[labels == HEAD_CLASSES.index("bone")]) > 300  # bone is dense
    brain = np.isin(labels, [HEAD_CLASSES.index(c) for c in ("gm", "wm")])
    assert -10 < np.median(hu[brain]) < 70  # brain parenchyma in its HU range


def test_ct_window_is_identical_at_every_ct_site(head):
    root = head.root
    windows, maps = set(), set()
    folders = [root / "sites" / s for s in SITES] + [root / "heldout" / split / s
                                                     for split in ("fit", "test") for s in SITES]
    for folder in folders:
        assert (folder / "dataset.toml").is_file()
        manifest = load_manifest(folder, root=root)
        assert manifest.labels.names == HEAD_CLASSES
        if folder.name == "M":
            assert manifest.modality == "MR" and manifest.intensity.normalisation == "percentile"
            continue
        assert manifest.modality == "CT" and manifest.intensity.units == "HU"
        windows.add(manifest.intensity.window)
        image = _load(next((folder / "images").glob("*.nii.gz")))
        maps.add(intensity_map(manifest.intensity, image))
    assert windows == {TINY.window} and len(maps) == 1  # one window, one map, every CT site


def test_heldout_pairs_exist_at_every_site(head):
    for split, count in (("fit", 1), ("test", 2)):
        for number in range(count):
            name = f"h{split[0]}-{number:04d}.nii.gz"
            labels = []
            for site in SITES:
                folder = head.root / "heldout" / split / site
                for kind in ("images", "labels", "clean"):
                    assert (folder / kind / name).is_file(), f"{split}/{site}/{kind}/{name}"
                labels.append(_load(folder / "labels" / name))
                assert _load(folder / "clean" / name).dtype == np.float32
            assert all(np.array_equal(labels[0], other) for other in labels[1:])  # paired


def test_scan_noise_is_the_sites_dose(head):
    """Scan minus clean rendering of held-out pairs: std = the site's noise_hu."""
    for site in ("A", "B", "D"):
        folder = head.root / "heldout" / "test" / site
        residual = []
        for path in sorted((folder / "images").glob("*.nii.gz")):
            scan, clean = _load(path).astype(float), _load(folder / "clean" / path.name)
            unclipped = (scan > -1024) & (scan < 3071)
            residual.append((scan - clean)[unclipped])
        std = float(np.concatenate(residual).std())
        assert abs(std - CT_PRESETS[site].noise_hu) < 0.1 * CT_PRESETS[site].noise_hu + 0.5


def test_at_least_six_classes_are_present(head):
    found = set()
    for path in (head.root / "sites").rglob("labels/*.nii.gz"):
        found |= set(np.unique(_load(path)).tolist())
    assert len(found) >= 6 and found <= set(range(len(HEAD_CLASSES)))


def test_build_is_deterministic_and_seeded(head, tmp_path):
    again = build_head_federation(TINY, tmp_path / "again")
    assert again.content_hash == head.content_hash
    assert build_head_federation(TINY, head.root).content_hash == head.content_hash  # reused
    with pytest.raises(FederationExistsError, match="different config"):
        build_head_federation(HeadSimConfig(**{**TINY.to_dict(), "seed": 6}), head.root)


def test_volumes_are_written_with_axial_slices_last(tmp_path):
    config = HeadSimConfig(seed=1, sites="A,M", subjects_per_site=1, public_size=1,
                           heldout_fit=0, heldout_test=1, image_size=24, dims=3)
    manifest = build_head_federation(config, tmp_path / "vol")
    root = manifest.root
    ct = nib.load(str(root / "sites" / "A" / "images" / "A-0000.nii.gz"))
    assert ct.shape == (24, 24, 24) and ct.get_data_dtype() == np.int16
    assert np.allclose(ct.header.get_zooms(), (10.0, 10.0, 10.0))
    mr = _load(root / "heldout" / "test" / "M" / "images" / "ht-0000.nii.gz")
    labels = _load(root / "heldout" / "test" / "M" / "labels" / "ht-0000.nii.gz")
    assert mr.shape == labels.shape == (24, 24, 24)
    assert len(np.unique(labels)) >= 6
    assert load_manifest(root / "sites" / "A", root=root).dims == 3
    # axial slices last, feet first: the head's top (less tissue) is at the high z end
    area = (labels > 0).sum(axis=(0, 1))
    assert area[: 24 // 2].sum() > 0 and area[-1] < area.max()


def test_cli_selects_the_head_federation_and_refuses_brain_only_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sim_main(["build", "--help"])
    assert "head-ct" in capsys.readouterr().out
    code = sim_main(["build", "--federation", "head-ct", "--out", str(tmp_path / "x"),
                     "--dicom-sites", "B"])
    assert code == 2 and "--dicom-sites: brain federation only" in capsys.readouterr().err
    code = sim_main(["build", "--federation", "head-ct", "--out", str(tmp_path / "x"),
                     "--sites", "A,E"])
    assert code == 2 and "site 'E' is not one of A, B, C, D, M" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
