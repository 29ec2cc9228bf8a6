"""`medgen-client data check DIR`: table, reasons, counts, JSON, exit codes; read-only."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
from pydicom.data import get_testdata_file

from medgen.data.data_check import main
from medgen.data.site_data import load_site
from medgen.sim.dicom_export import PHI

from conftest import tree_digest


def test_table_lists_usable_and_skipped_with_reasons(corpus, capsys):
    root, series = corpus
    before = tree_digest(root)
    # a bare PACS export (no images/): every file is checked, but a node cannot train on it
    assert main([str(root), "--image-size", "32"]) == 1
    out = capsys.readouterr().out
    assert tree_digest(root) == before
    for name, s in series.items():
        assert name in out  # every series' folder is named
    assert "missing slice(s)" in out and "duplicate slice" in out and "BurnedInAnnotation=YES" in out
    assert series["corrupt_file"].files[3] + ": pixel data truncated" in out
    assert "README.txt: no reader for this file type: not an image medgen reads" in out
    assert "-> 32x32x26" in out  # the slices that train: 6 blank end slices are dropped
    assert "CT: 1 usable (12 slices)" in out
    assert "has no images/ folder, so a node cannot train on it as it is" in out
    for secret in PHI.values():
        assert secret not in out


def test_json_report_counts(corpus, capsys):
    root, series = corpus
    assert main([str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    usable = sum(not s.problem for s in series.values())
    assert report["usable"] == usable and not report["site_folder"] and not report["trains"]
    assert report["counts"]["MR"] == {"usable": 4, "slices": 26 + 26 + 8 + 6}
    assert report["patients"] == 2  # every series but 'phi' has one PatientID
    statuses = {row["item"]: row["status"] for row in report["rows"]}
    assert statuses["mni_t1"].startswith("usable") and statuses["missing_slice"].startswith(
        "skipped: series")
    assert "missing slice(s)" in statuses["missing_slice"]


def test_verdict_is_what_the_loader_trains_on(corpus, tmp_path, capsys):
    """As a site's images/, the corpus gives data check's patients == load_site's."""
    root, _ = corpus
    shutil.copytree(root, tmp_path / "site" / "images")
    assert main([str(tmp_path / "site"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    site = load_site(tmp_path / "site", 32)
    assert report["trains"] and report["patients"] == site.num_patients == 2
    assert not report["labelled"] and not site.has_labels
    assert sorted(r["item"] for r in report["rows"] if r["status"] != "usable"
                  and r["status"].startswith("skipped")) == sorted(
        s.reason.split(": ", 1)[0] for s in site.skipped)
    assert sum(r["slices"] for r in report["rows"]) == site.num_slices


def test_nifti_items_are_checked_too(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(8, 8), np.eye(4)),
             tmp_path / "images" / "a.nii.gz")
    (tmp_path / "images" / "b.nii.gz").write_bytes(b"not a nifti")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images/a.nii.gz" in out and "usable" in out
    assert "images/b.nii.gz" in out and "not a readable NIfTI" in out
    assert "warning: no labels/ folder" in out


def test_exit_code_1_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path)]) == 1
    assert main([str(tmp_path / "absent")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_label_maps_alone_do_not_make_a_site_usable(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(np.array([[0, 1], [2, 3]], dtype=np.uint8), np.eye(4)),
             tmp_path / "labels" / "a.nii.gz")
    assert main([str(tmp_path), "--json"]) == 1  # label maps alone: nothing to train on
    rows = {r["item"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert "no image of the same name" in rows["labels/a.nii.gz"]["status"]


def test_label_values_are_checked_with_their_image(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k, (name, labels) in enumerate((("a", [[0, 1], [2, 3]]), ("b", [[0, 7], [2, 3]]))):
        nib.save(nib.Nifti1Image(np.array([[1, 2], [3, 4 + k]], dtype=np.int16), np.eye(4)),
                 tmp_path / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.array(labels, dtype=np.uint8), np.eye(4)),
                 tmp_path / "labels" / f"{name}.nii.gz")
    assert main([str(tmp_path), "--json"]) == 0
    rows = {r["item"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["images/a.nii.gz"]["status"] == "usable"
    assert rows["images/a.nii.gz"]["labels"] == "labels/a.nii.gz"
    assert "label map labels/b.nii.gz holds label value(s) 7 outside the label schema" in rows["images/b.nii.gz"]["status"]


def test_seg_without_its_images_is_reported(tmp_path, capsys):
    shutil.copyfile(get_testdata_file("liver.dcm"), tmp_path / "seg")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "ct")
    assert main([str(tmp_path), "--json"]) == 1  # a bare folder: checked, not trainable
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 1
    [seg] = [r for r in report["rows"] if r["item"] == "seg"]
    assert seg["status"].startswith("skipped: segmentation (SEG) whose image series is not in "
                                    "this folder")
