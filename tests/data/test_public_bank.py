"""`medgen data public-bank`: remapped, validated, with provenance; bad remaps refused."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from medgen.cli import main as medgen_main
from medgen.data import RemapError
from medgen.data.public_bank import build_public_bank
from medgen.data.nifti_io import write_nifti

SCHEMA = """
[dataset]
modality = "CT"
[labels]
names = ["background", "csf", "gm", "wm"]
"""
# FreeSurfer-like source values: 0 unknown, 24 CSF, 3/42 cortex, 2/41 white matter
GOOD_REMAP = '[remap]\n"0" = "background"\n"24" = "csf"\n"3" = "gm"\n"42" = "gm"\n"2" = "wm"\n"41" = 3\n'


@pytest.fixture
def public(tmp_path):
    """Two public 'segmentations' in source values, one of them in a sub-folder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "atlas"
    for name in ("s1.nii.gz", "more/s2.nii.gz"):
        labels = rng.choice([0, 24, 3, 42, 2, 41], size=(12, 10, 4)).astype(np.int16)
        write_nifti(folder / name, labels, (1.0, 1.0, 2.0))
    (tmp_path / "dataset.toml").write_text(SCHEMA)
    (tmp_path / "remap.toml").write_text(GOOD_REMAP)
    return tmp_path


def test_bank_is_remapped_with_provenance(public):
    out = public / "bank"
    provenance = build_public_bank(public / "atlas", public / "remap.toml",
                                   public / "dataset.toml", out)
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["more__s2.nii.gz", "s1.nii.gz"]
    source = np.asanyarray(nib.load(str(public / "atlas" / "s1.nii.gz")).dataobj)
    bank = np.asanyarray(nib.load(str(out / "labels" / "s1.nii.gz")).dataobj)
    expected = {0: 0, 24: 1, 3: 2, 42: 2, 2: 3, 41: 3}
    assert np.array_equal(bank, np.vectorize(expected.get)(source)) and bank.dtype == np.uint8
    assert np.allclose(nib.load(str(out / "labels" / "s1.nii.gz")).header.get_zooms(), (1, 1, 2))
    saved = json.loads((out / "provenance.json").read_text())
    assert saved == provenance
    record = {r["source"]: r for r in saved["files"]}["s1.nii.gz"]
    assert record["sha256"] == hashlib.sha256((public / "atlas" / "s1.nii.gz").read_bytes()).hexdigest()
    assert record["output_sha256"] == hashlib.sha256((out / "labels" / "s1.nii.gz").read_bytes()).hexdigest()
    assert saved["remap"]["table"] == {"0": "background", "2": "wm", "24": "csf", "3": "gm",
                                       "41": "wm", "42": "gm"}
    assert saved["schema"]["names"] == ["background", "csf", "gm", "wm"]
    assert saved["schema"]["sha256"] == hashlib.sha256((public / "dataset.toml").read_bytes()).hexdigest()
    assert (out / "dataset.toml").read_text() == SCHEMA
    assert sum(saved["class_voxels"].values()) == 2 * 12 * 10 * 4


@pytest.mark.parametrize("remap, words", [
    ('[remap]\n"0" = "background"\n"24" = "csf"\n"3" = "gm"\n"42" = "gm"\n"2" = "wm"\n"41" = "white"\n',
     ['"41" = \'white\'', "not a class of the schema", "0 background, 1 csf"]),
    ('[remap]\n"0" = "background"\n"24" = "csf"\n"3" = "gm"\n"42" = "gm"\n"2" = "wm"\n',
     ["value(s) 41", "does not map", '"41" = "<class>"']),
    ('[remap]\n"zero" = "background"\n', ["'zero'", "not an integer source value"]),
    ('[other]\n"0" = "background"\n', ["no [remap] table"]),
])
def test_bad_remap_is_refused_naming_file_and_value(public, remap, words):
    (public / "remap.toml").write_text(remap)
    with pytest.raises(RemapError) as err:
        build_public_bank(public / "atlas", public / "remap.toml", public / "dataset.toml",
                          public / "bank")
    message = str(err.value)
    assert "remap.toml" in message
    for word in words:
        assert word in message
    assert not (public / "bank").exists()  # nothing half-written
    assert not [p for p in public.iterdir() if p.name.startswith(".bank")]


def test_cli_reports_a_bad_remap_and_exits_2(public, capsys):
    (public / "remap.toml").write_text('[remap]\n"0" = "background"\n')
    code = medgen_main(["data", "public-bank", "--labels", str(public / "atlas"),
                        "--remap", str(public / "remap.toml"), "--schema",
                        str(public / "dataset.toml"), "--out", str(public / "bank")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "more/s2.nii.gz" in err and "does not map" in err


def test_cli_builds_the_bank(public, capsys):
    code = medgen_main(["data", "public-bank", "--labels", str(public / "atlas"),
                        "--remap", str(public / "remap.toml"), "--schema",
                        str(public / "dataset.toml"), "--out", str(public / "bank")])
    assert code == 0 and "2 label maps" in capsys.readouterr().out
    assert (public / "bank" / "provenance.json").is_file()
