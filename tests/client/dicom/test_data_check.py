"""`medgen-client data check DIR`: table, reasons, counts, JSON, exit codes; read-only."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medgen.client.data_check import main
from medgen.sim.dicom_export import PHI

from conftest import tree_digest


def test_table_lists_usable_and_skipped_with_reasons(corpus, capsys):
    root, series = corpus
    before = tree_digest(root)
    assert main([str(root), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert tree_digest(root) == before
    for name, s in series.items():
        assert name in out  # every series' folder is named
    assert "missing slice(s)" in out and "duplicate slice" in out and "BurnedInAnnotation=YES" in out
    assert series["corrupt_file"].files[3] + ": pixel data truncated" in out
    assert "README.txt: not an image medgen reads" in out
    assert "-> 32x32x32" in out
    assert "CT: 1 usable (12 slices), 0 skipped" in out
    for secret in PHI.values():
        assert secret not in out


def test_json_report_counts(corpus, capsys):
    root, series = corpus
    assert main([str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    usable = sum(not s.problem for s in series.values())
    assert report["usable"] == usable
    assert report["counts"]["MR"] == {"usable": 4, "skipped": 4, "slices": 32 + 32 + 8 + 6}
    statuses = {row["where"]: row["status"] for row in report["rows"]}
    assert statuses["mni_t1"] == "usable" and statuses["missing_slice"].startswith("skipped: missing")


def test_nifti_items_are_checked_too(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(8, 8), np.eye(4)),
             tmp_path / "images" / "a.nii.gz")
    (tmp_path / "images" / "b.nii.gz").write_bytes(b"not a nifti")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images/a.nii.gz" in out and "usable" in out
    assert "images/b.nii.gz" in out and "not a readable NIfTI" in out


def test_exit_code_1_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path)]) == 1
    assert main([str(tmp_path / "absent")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_label_maps_checked_but_do_not_make_a_site_usable(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(np.array([[0, 1], [2, 3]], dtype=np.uint8), np.eye(4)),
             tmp_path / "labels" / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.array([[0, 7], [2, 3]], dtype=np.uint8), np.eye(4)),
             tmp_path / "labels" / "b.nii.gz")
    assert main([str(tmp_path), "--json"]) == 1  # label maps alone: nothing to train on
    rows = {r["item"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["labels/a.nii.gz"]["status"] == "usable" and rows["labels/a.nii.gz"]["kind"] == "nifti-label"
    assert "label values must be integers 0..3" in rows["labels/b.nii.gz"]["status"]


def test_seg_without_its_images_is_reported(tmp_path, capsys):
    import shutil

    from pydicom.data import get_testdata_file

    shutil.copyfile(get_testdata_file("liver.dcm"), tmp_path / "seg")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "ct")
    assert main([str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    [seg] = [r for r in rows if r["kind"] == "dicom-seg"]
    assert seg["status"] == "skipped: its image series is not in this folder"
