"""dataset.toml: parsing, site over root, the brain default, and errors that say where."""

from pathlib import Path

import pytest

from medgen.data import DatasetManifest, LabelSchema, ManifestError, load_manifest

CT_ROOT = """
[dataset]
modality = "CT"
dims = 2
name = "head-ct"

[intensity]
units = "HU"
normalisation = "window"
window = [-1000, 2000]

[labels]
names = ["air", "soft_tissue", "bone"]
values = [0, 1, 5]
"""

MR_SITE = """
[dataset]
modality = "MR"

[intensity]
normalisation = "percentile"
percentiles = [1, 99]
"""


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.toml"
    path.write_text(text)
    return path


def test_ct_root_parses_to_window_and_schema(tmp_path):
    _write(tmp_path, CT_ROOT)
    manifest = load_manifest(tmp_path / "sites" / "A", root=tmp_path)
    assert manifest.modality == "CT" and manifest.dims == 2 and manifest.name == "head-ct"
    assert manifest.intensity.units == "HU" and manifest.intensity.window == (-1000.0, 2000.0)
    assert manifest.labels == LabelSchema(("air", "soft_tissue", "bone"), (0, 1, 5))
    assert manifest.sources == (str(tmp_path / "dataset.toml"),)


def test_site_table_replaces_root_table(tmp_path):
    _write(tmp_path, CT_ROOT)
    _write(tmp_path / "sites" / "M", MR_SITE)
    manifest = load_manifest(tmp_path / "sites" / "M", root=tmp_path)
    assert manifest.modality == "MR" and manifest.intensity.units == "arbitrary"
    assert manifest.intensity.normalisation == "percentile"
    assert manifest.intensity.percentiles == (1.0, 99.0) and manifest.intensity.window is None
    assert manifest.labels.names == ("air", "soft_tissue", "bone")  # inherited from the root


def test_round_trip_through_toml(tmp_path):
    original = DatasetManifest.from_file(_write(tmp_path, CT_ROOT))
    original.write(tmp_path / "copy")
    again = DatasetManifest.from_file(tmp_path / "copy" / "dataset.toml")
    assert again.to_tables() == original.to_tables()


def test_no_dataset_toml_is_the_brain_default(tmp_path):
    manifest = load_manifest(tmp_path / "site", root=tmp_path)
    assert manifest == DatasetManifest.default_brain()
    assert manifest.modality == "MR" and manifest.labels.names == ("background", "csf", "gm", "wm")
    assert manifest.labels.values == (0, 1, 2, 3)
    assert manifest.intensity.normalisation == "percentile"
    assert manifest.intensity.percentiles == (0.5, 99.5)


def test_labels_none_means_unlabelled(tmp_path):
    _write(tmp_path, '[dataset]\nmodality = "MR"\n[labels]\nnone = true\n')
    assert load_manifest(tmp_path).labels is None


@pytest.mark.parametrize("text, words", [
    ('[dataset]\nmodality = "XR"\n', ["[dataset] modality", "'XR'", "CT"]),
    ('[dataset]\ndims = 2\n', ["[dataset] modality", "missing"]),
    ('[dataset]\nmodality = "CT"\ndims = 4\n', ["[dataset] dims", "2 (slices) or 3"]),
    ('[dataset]\nmodality = "CT"\n[intensity]\nunits = "arbitrary"\n', ["[intensity] units", "HU"]),
    ('[dataset]\nmodality = "CT"\n[intensity]\nnormalisation = "percentile"\n',
     ["[intensity] normalisation", "window"]),
    ('[dataset]\nmodality = "CT"\n[intensity]\nwindow = [100, -100]\n', ["[intensity] window", "lo < hi"]),
    ('[dataset]\nmodality = "MR"\n[intensity]\npercentiles = [50, 120]\n', ["[intensity] percentiles"]),
    ('[dataset]\nmodality = "MR"\n[intensity]\nwindw = [0, 1]\n', ["unknown key", "windw", "[intensity]"]),
    ('[datset]\nmodality = "MR"\n', ["unknown table", "[datset]"]),
    ('[dataset]\nmodality = "MR"\n[labels]\nnames = ["bg", "bg"]\n', ["[labels]", "more than once"]),
    ('[dataset]\nmodality = "MR"\n[labels]\nnames = ["bg", "wm"]\nvalues = [0]\n', ["[labels]", "one value per name"]),
    ('[dataset]\nmodality = "MR"\n[labels]\nvalues = [0, 1]\n', ["[labels] names", "missing"]),
    ('[dataset]\nmodality = "MR"\n[geometry]\norientation = "RAX"\n', ["[geometry] orientation", "RAS"]),
    ('[dataset]\nmodality = "MR"\n[geometry]\nspacing = [1, -1]\n', ["[geometry] spacing"]),
    ('[dataset\nmodality = "MR"\n', ["not valid TOML"]),
])
def test_errors_name_the_file_and_key(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_site_may_not_move_the_root_ct_window(tmp_path):
    _write(tmp_path, CT_ROOT)
    site = _write(tmp_path / "sites" / "B", '[dataset]\nmodality = "CT"\n'
                  '[intensity]\nunits = "HU"\nwindow = [-100, 200]\n')
    with pytest.raises(ManifestError, match="identical at every site") as err:
        load_manifest(site.parent, root=tmp_path)
    assert str(site) in str(err.value) and str(tmp_path / "dataset.toml") in str(err.value)
