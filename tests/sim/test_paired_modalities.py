"""Paired, misaligned MR/CT sites of the head federation (sim/paired_modalities.py): off by
default without changing a byte, deterministic, the stored deformation is the true one,
and the data model serves the pairs through the site's declared [paired] table."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from medgen.data.errors import ManifestError
from medgen.data.manifest import DatasetManifest, load_manifest
from medgen.data.site_data import load_site
from medgen.sim.cli import build_parser
from medgen.sim.cli import main as sim_main
from medgen.sim.config import SimConfigError
from medgen.sim.head_cli import _paired
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation
from medgen.sim.head_tissues import HEAD_CLASSES

PAIRED = HeadSimConfig(seed=3, sites="A,B", paired_sites="A", subjects_per_site=2, public_size=1,
                       heldout_fit=0, heldout_test=3, image_size=32)
PLAIN = dataclasses.replace(PAIRED, paired_sites="")
TRUTH = ("paired", "paired-clean", "paired-labels", "deformation")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("paired")
    return build_head_federation(PAIRED, root / "paired"), build_head_federation(PLAIN, root / "plain")


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}


def test_the_option_is_off_by_default_and_leaves_the_default_config_hash_alone():
    """A default config's dict (hence its hash and manifest.json) does not mention the
    option: builds made before it existed are reused byte for byte. The pinned value is
    the hash of this config before the option was added."""
    assert not set(PLAIN.to_dict()) & {"paired_sites", "misregistration_mm"}
    before = HeadSimConfig(subjects_per_site=3, public_size=2, heldout_fit=1, heldout_test=2, image_size=32)
    assert before.config_hash() == "0633a051d2d5620ae67d47fbb30b69c9526a25d7caec3a20578e5361ea6d4510"
    assert HeadSimConfig.from_dict(PAIRED.to_dict()) == PAIRED and PAIRED.config_hash() != PLAIN.config_hash()
    with pytest.raises(SimConfigError, match="paired_sites"):
        HeadSimConfig(sites="A,M", paired_sites="M")
    with pytest.raises(SimConfigError, match="dims=2"):
        HeadSimConfig(sites="A", paired_sites="A", dims=3, image_size=32)


def test_a_paired_build_only_adds_files_and_is_deterministic(builds, tmp_path):
    """Every file of the unpaired build is byte-identical in the paired one (the CT of a
    paired site is the same scan) except the paired site's dataset.toml; what is added is
    the MR folder and the held-out truth. The same config gives the same bytes again."""
    paired, plain = builds
    got, base = _files(paired.root), _files(plain.root)
    changed = {k for k in base if got.get(k) != base[k]}
    assert changed == {"sites/A/dataset.toml", "heldout/test/A/dataset.toml"}
    added = {k.split("/")[-2] if k.startswith("sites/") else k.split("/")[3] for k in set(got) - set(base)}
    assert added == {"paired", "paired-clean", "paired-labels", "deformation"}
    assert {k for k in set(got) - set(base) if k.startswith("sites/")} == {f"sites/A/paired/A-000{i}.nii.gz" for i in range(2)}
    assert not any(k.startswith(("sites/B/paired", "heldout/test/B/paired")) for k in got)
    again = build_head_federation(PAIRED, tmp_path / "again")
    assert again.content_hash == paired.content_hash and _files(again.root) == got
    assert paired.data["paired"]["sites"] == ["A"] and "paired" not in plain.data


def test_the_stored_deformation_maps_the_mr_anatomy_onto_the_ct_anatomy(builds):
    """Warping the CT's label map by the stored ddf (MONAI Warp) reproduces the anatomy the
    MR shows (its labels, and the head outline in the MR scan itself) far better than
    the unwarped CT does. With the identity deformation (ddf = 0) the 'warped' agreement
    equals the unwarped one and both margins fail."""
    paired, _ = builds
    held = paired.root / "heldout" / "test" / "A"
    warp = Warp(mode="bilinear", padding_mode="zeros")
    for path in sorted((held / "deformation").iterdir()):
        ddf = torch.from_numpy(np.moveaxis(_load(path), -1, 0).astype(np.float32))[None]
        assert ddf.shape == (1, 2, 32, 32) and float(ddf.abs().max()) > 0.5
        ct_labels = torch.from_numpy(_load(held / "labels" / path.name).astype(np.int64))
        one_hot = F.one_hot(ct_labels, len(HEAD_CLASSES)).permute(2, 0, 1)[None].float()
        warped = warp(one_hot, ddf)[0].argmax(0).numpy()
        mr_labels = _load(held / "paired-labels" / path.name)
        assert (warped == mr_labels).mean() > (ct_labels.numpy() == mr_labels).mean() + 0.04
        mr = _load(held / "paired" / path.name).astype(np.float64)
        mr_head = mr > 0.15 * np.percentile(mr, 99)
        dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
        assert dice(warped > 0, mr_head) > dice(ct_labels.numpy() > 0, mr_head) + 0.01
    clean = _load(held / "paired-clean" / path.name)
    assert clean.dtype == np.float32 and clean.max() > 300  # the aligned CT in HU (bone)


def test_the_site_declares_its_pairs_and_the_loader_serves_them_row_for_row(builds, tmp_path):
    paired, _ = builds
    manifest = load_manifest(paired.site_dir("A"), root=paired.root)
    assert manifest.paired is not None and manifest.paired.modality == "MR" and not manifest.paired.registered
    assert load_manifest(paired.site_dir("B"), root=paired.root).paired is None
    site = load_site(paired.site_dir("A"), 32)
    assert site.paired.shape == site.images.shape == (2, 1, 32, 32) and len(site.paired_intensity_maps) == 2
    assert load_site(paired.site_dir("B"), 32).paired is None
    # row i's MR is patient i's: its own file, normalised by its own percentile map
    for row, name in enumerate(sorted(p.name for p in (paired.site_dir("A") / "paired").iterdir())):
        mr = _load(paired.site_dir("A") / "paired" / name).astype(np.float64)
        expected = site.paired_intensity_maps[row].forward(mr)
        assert np.allclose(site.paired[row, 0].numpy(), expected, atol=1e-5)
    # a record without its MR partner is skipped and named, not served unpaired
    copy = tmp_path / "sites" / "A"
    shutil.copytree(paired.site_dir("A"), copy)
    (tmp_path / "dataset.toml").write_text((paired.root / "dataset.toml").read_text())
    (copy / "paired" / "A-0001.nii.gz").unlink()
    partial = load_site(copy, 32)
    assert partial.num_patients == 1 and partial.paired.shape[0] == 1
    assert any("A-0001" in s.reason and "partner" in s.reason for s in partial.skipped)


def test_the_paired_table_is_validated_and_round_trips(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    text = '[dataset]\nmodality = "CT"\n\n[labels]\nnone = true\n\n[paired]\nmodality = "MR"\n'
    (site / "dataset.toml").write_text(text)
    manifest = load_manifest(site)
    assert manifest.paired.folder == "paired" and manifest.paired.manifest(manifest).modality == "MR"
    assert DatasetManifest.from_tables(manifest.to_tables(), ()).paired == manifest.paired
    for bad, key in (('folder = "images"', "folder"), ('modality = "XX"', "modality"),
                     ('registered = "no"', "registered"), ("typo = 1", "typo")):
        (site / "dataset.toml").write_text(text + bad + "\n" if "modality" not in bad
                                           else text.replace('modality = "MR"', bad))
        with pytest.raises(ManifestError, match=key):
            load_manifest(site)
    assert "paired" not in DatasetManifest.default_brain().to_tables()  # unpaired cache keys unchanged


def test_the_cli_passes_paired_sites_to_the_head_build_only(capsys):
    """`medgen sim build --federation head-ct --paired-sites A` reaches HeadSimConfig; the
    brain federation refuses the flag instead of ignoring it; no flag, no config change."""
    args = build_parser().parse_args(["build", "--out", "x", "--federation", "head-ct", "--paired-sites", "A",
                                      "--misregistration-mm", "4"])
    assert _paired(args) == {"paired_sites": "A", "misregistration_mm": 4.0}
    assert _paired(build_parser().parse_args(["build", "--out", "x", "--federation", "head-ct"])) == {}
    assert sim_main(["build", "--out", "x", "--paired-sites", "A"]) == 2
    assert "head-ct federation only" in capsys.readouterr().err
