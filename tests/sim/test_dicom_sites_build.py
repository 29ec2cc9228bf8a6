"""`dicom_sites` / `--dicom-sites`: a simulated site written as a DICOM folder instead of NIfTI."""

from __future__ import annotations

import pydicom
import pytest
import torch

from medgen.data.site_data import load_site
from medgen.sim.cli import main
from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.federation import build_federation

SMALL = dict(seed=1, sites="A,B", subjects_per_site=3, public_size=1, heldout_fit=0,
             heldout_test=0, image_size=32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dicom_sites")
    nifti = build_federation(SimConfig(**SMALL), root / "nifti")
    dicom = build_federation(SimConfig(**SMALL, dicom_sites="B"), root / "dicom")
    return nifti, dicom


def test_dicom_site_holds_one_series_per_patient_and_no_nifti_image(builds):
    nifti, dicom = builds
    site = dicom.site_dir("B")
    assert not list((site / "images").glob("*.nii*"))
    subjects = sorted(p.name for p in (site / "images").iterdir())
    assert subjects == [p.name[:-7] for p in sorted((nifti.site_dir("B") / "images").iterdir())]
    for subject in subjects:
        [file] = list((site / "images" / subject).iterdir())
        assert pydicom.dcmread(file).Modality == "MR"
    # labels stay NIfTI, byte-identical; the other sites are untouched
    for folder in ("sites/B/labels", "sites/A/images", "sites/A/labels", "public/labels"):
        assert {p.name: p.read_bytes() for p in (nifti.root / folder).iterdir()} == \
            {p.name: p.read_bytes() for p in (dicom.root / folder).iterdir()}
    assert dicom.data["site_formats"] == {"A": "nifti", "B": "dicom"}
    assert dicom.config.dicom_sites == ("B",)


def test_dicom_site_loads_the_same_tensors_as_its_nifti_build(builds):
    nifti, dicom = builds
    a = load_site(nifti.site_dir("B"), 32)
    b = load_site(dicom.site_dir("B"), 32)
    assert b.skipped == [] and b.num_patients == a.num_patients == 3
    torch.testing.assert_close(b.images, a.images, rtol=0, atol=0)
    assert torch.equal(b.labels, a.labels) and torch.equal(b.patient_index, a.patient_index)


def test_dicom_build_is_deterministic_and_nifti_builds_keep_their_hash(builds, tmp_path):
    _, dicom = builds
    again = build_federation(SimConfig(**SMALL, dicom_sites=["B"]), tmp_path / "again")
    assert again.content_hash == dicom.content_hash
    # the new field is left out of an all-NIfTI config: existing builds are still recognised
    assert "dicom_sites" not in SimConfig(**SMALL).to_dict()
    assert SimConfig.from_dict(dicom.data["config"]) == SimConfig(**SMALL, dicom_sites="B")


def test_dicom_sites_must_name_sites_of_the_build():
    with pytest.raises(SimConfigError, match="dicom_sites"):
        SimConfig(**SMALL, dicom_sites="C")


def test_cli_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "--dicom-sites" in capsys.readouterr().out
    args = ["build", "--out", str(tmp_path / "d"), "--seed", "1", "--subjects-per-site", "1",
            "--image-size", "32", "--sites", "A,B", "--public-size", "0", "--heldout-fit", "0",
            "--heldout-test", "0", "--workers", "1"]
    assert main(args + ["--dicom-sites", "E"]) == 2
    assert "dicom_sites" in capsys.readouterr().err
    assert main(args + ["--dicom-sites", "A"]) == 0
    assert not list((tmp_path / "d/sites/A/images").glob("*.nii.gz"))
    assert (tmp_path / "d/sites/B/images/B-0000.nii.gz").is_file()
