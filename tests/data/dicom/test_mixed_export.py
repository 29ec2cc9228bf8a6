"""A hospital export mixing CT, MR, NM, CR and OT series, a scout, secondary captures and a
coronal reformat, under a CT manifest: only the real axial CT series trains; every other
series is left out and named with its reason, by `data check` and in the site's data."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medgen.data.data_check import check_folder, format_report
from medgen.data.dicom import group_series, scan_folder
from medgen.data.dicom.acquisition import is_secondary_capture, plane
from medgen.data.site_data import load_site
from medgen.sim.dicom_export import write_series

SC = "1.2.840.10008.5.1.4.1.1.7"
CT_TOML = ('[dataset]\nmodality = "CT"\n[intensity]\nwindow = [-1000, 2000]\n'
           '[labels]\nnone = true\n')


def real_ct(slices: int = 4) -> np.ndarray:
    """Real CT voxels (pydicom's CT_small, in HU), stacked with a few HU per slice."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.stack([hu + 3 * k for k in range(slices)], axis=-1)[::4, ::4]


def _coronal(files: list) -> None:
    """Turn an axial series into a coronal one: rows along x, columns along -z, slices along y."""
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0.0, 2.0 * k, 0.0]
        ds.save_as(path)


@pytest.fixture
def export(tmp_path):
    """site/images/<series folders>, as a PACS export arranged under images/."""
    site = tmp_path / "site"
    images = site / "images"
    volume = real_ct()
    write_series(volume, (2.0, 2.0, 3.0), images / "ct_axial", modality="CT", seed=1,
                 rescale_intercept=-1024.0, patient_id="P1")
    write_series(volume, (2.0, 2.0, 3.0), images / "ct_scout", modality="CT", seed=2,
                 rescale_intercept=-1024.0, patient_id="P1",
                 extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    write_series(volume[..., :1], (2.0, 2.0, 3.0), images / "ct_screenshot", modality="CT", seed=3,
                 rescale_intercept=-1024.0, patient_id="P1", extra={"SOPClassUID": SC})
    _coronal(write_series(volume, (2.0, 2.0, 2.0), images / "ct_coronal", modality="CT", seed=4,
                          rescale_intercept=-1024.0, patient_id="P1", shuffle_names=False))
    positive = volume - volume.min()
    write_series(positive, (2.0, 2.0, 3.0), images / "mr", modality="MR", seed=5, patient_id="P2")
    write_series(positive, (2.0, 2.0, 3.0), images / "nm", modality="NM", seed=6, patient_id="P3")
    write_series(positive[..., :1], (0.2, 0.2, 1.0), images / "cr", modality="CR", seed=7,
                 patient_id="P4")
    write_series(positive[..., :1], (1.0, 1.0, 1.0), images / "ot", modality="OT", seed=8,
                 patient_id="P5", extra={"SOPClassUID": SC + ".4"})
    (site / "dataset.toml").write_text(CT_TOML)
    return site


REASONS = {
    "ct_scout": "localizer/scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER",
    "ct_screenshot": "secondary capture (SOP Class 1.2.840.10008.5.1.4.1.1.7)",
    "ct_coronal": "coronal slices",
    "mr": "modality MR contradicts the manifest's CT",
    "nm": "modality NM contradicts the manifest's CT",
    "cr": "modality CR contradicts the manifest's CT",
    "ot": "secondary capture (SOP Class 1.2.840.10008.5.1.4.1.1.7.4)",
}


def test_data_check_keeps_only_the_axial_ct_series_and_names_every_other(export):
    report = check_folder(export)
    assert [r.item for r in report.rows if r.status == "usable"] == ["images/ct_axial"]
    assert report.counts() == {"CT": {"usable": 1, "slices": 4}} and report.trains
    skipped = {r.item.split("/")[1]: r.status for r in report.skipped}
    assert set(skipped) == set(REASONS), skipped
    for folder, reason in REASONS.items():
        assert reason in skipped[folder], (folder, skipped[folder])
    text = format_report(report)
    assert "1 usable record(s) of 1 distinct patient(s)" in text
    for reason in REASONS.values():
        assert reason in text


def test_the_site_data_trains_on_the_axial_ct_in_hu_and_records_every_left_out_series(export):
    site = load_site(export, image_size=16)
    assert site.num_patients == 1 and len(site.images) == 4   # 4 axial slices of one patient
    reasons = "\n".join(s.reason for s in site.skipped)
    for folder, reason in REASONS.items():
        assert f"images/{folder}" in reasons and reason in reasons, folder
    assert site.intensity_of(0).to_dict()["kind"] == "window"   # the CT's HU, through the window


def test_without_a_manifest_modality_is_not_judged_but_acquisitions_still_are(export):
    (export / "dataset.toml").unlink()
    usable = {r.item.split("/")[1] for r in check_folder(export).rows if r.status == "usable"}
    assert usable == {"ct_axial", "mr", "nm", "cr"}   # as before manifests: every modality counts


def test_plane_and_secondary_capture_rules():
    assert plane((1, 0, 0, 0, 1, 0)) == "axial"
    assert plane((1, 0, 0, 0, np.cos(0.4), np.sin(0.4))) == "axial"      # gantry tilt 23 degrees
    assert plane((1, 0, 0, 0, 0, -1)) == "coronal" and plane((0, 1, 0, 0, 0, -1)) == "sagittal"
    assert is_secondary_capture(SC) and is_secondary_capture(SC + ".2")
    assert not is_secondary_capture("1.2.840.10008.5.1.4.1.1.77.1.4")   # VL photographic
    assert not is_secondary_capture("1.2.840.10008.5.1.4.1.1.2")         # CT image storage


def test_axial_only_can_be_switched_off_for_other_planes(export):
    from medgen.data.dicom import DicomReadOptions
    from medgen.data.dicom.reader import read_folder

    volumes, problems = read_folder(export / "images" / "ct_coronal", DicomReadOptions(axial_only=False),
                                    salt=b"s")
    assert len(volumes) == 1 and not problems
    [series] = group_series(scan_folder(export / "images" / "ct_coronal"))
    assert series.problems[0].startswith("coronal slices")
