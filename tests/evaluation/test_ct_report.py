"""CT in the report: grids through the manifest's fixed display window, per-tissue histograms
and means in HU per site, MR sites on their own normalised axis; brain reports unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fabricated_run import SITES, make_run, synthetic_split

from medgen.data.errors import ManifestError
from medgen.data.manifest import DEFAULT_CT_DISPLAY_WINDOW, DatasetManifest, load_manifest
from medgen.evaluation.evaluator import site_intensity
from medgen.evaluation.report import render_report
from medgen.evaluation.report_tissue import _crop, tissue_means
from medgen.evaluation.sample_grid import FULL_RANGE, GrayDisplay
from medgen.evaluation.tissue_intensity import BINS, TissueUnits

HU = TissueUnits.from_window(-1000.0, 2000.0)
CT_DISPLAY = GrayDisplay(HU, (-150.0, 250.0))


def _normalised(hu: list[float]) -> torch.Tensor:
    return torch.tensor([(v + 1000.0) / 1500.0 - 1.0 for v in hu], dtype=torch.float32)[None]


def test_ct_grey_levels_follow_the_display_window_in_hu():
    gray = CT_DISPLAY.gray(_normalised([-1000, -150, -50, 60, 250, 1500]))[0, :, 0]
    # black at or below -150 HU, white at or above 250 HU, linear between
    assert gray.tolist() == [0, 0, 64, 134, 255, 255]
    assert "[-150, 250] HU" in CT_DISPLAY.caption() and "level 50, width 400" in CT_DISPLAY.caption()


def test_without_a_window_the_whole_normalised_range_is_shown_as_before():
    image = torch.linspace(-1.2, 1.2, 25).reshape(5, 5)
    before = ((image.clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert np.array_equal(FULL_RANGE.gray(image)[..., 0], before)


def test_ct_manifest_has_a_fixed_display_window_and_mr_has_none(tmp_path):
    (tmp_path / "dataset.toml").write_text('[dataset]\nmodality = "CT"\n')
    assert load_manifest(root=tmp_path).intensity.display == DEFAULT_CT_DISPLAY_WINDOW
    (tmp_path / "dataset.toml").write_text('[dataset]\nmodality = "CT"\n[intensity]\n'
                                           'display_window = [0, 80]\n')
    manifest = load_manifest(root=tmp_path)
    assert manifest.intensity.display == (0.0, 80.0)
    assert DatasetManifest.from_tables(manifest.to_tables(), ()).intensity.display == (0.0, 80.0)
    assert DatasetManifest.default_brain().intensity.display is None


def test_display_window_on_mr_and_a_site_moving_it_are_refused(tmp_path):
    (tmp_path / "dataset.toml").write_text('[dataset]\nmodality = "MR"\n[intensity]\n'
                                           'display_window = [0, 80]\n')
    with pytest.raises(ManifestError, match=r"display_window.*window"):
        load_manifest(root=tmp_path)
    root, site = tmp_path / "fed", tmp_path / "fed" / "sites" / "A"
    site.mkdir(parents=True)
    (root / "dataset.toml").write_text('[dataset]\nmodality = "CT"\n')
    (site / "dataset.toml").write_text('[dataset]\nmodality = "CT"\n[intensity]\ndisplay_window = [0, 80]\n')
    with pytest.raises(ManifestError, match="identical at every site"):
        load_manifest(site, root=root)


def test_evaluator_takes_each_sites_display_from_its_manifest(tmp_path):
    heldout = tmp_path / "heldout"
    for site, modality in (("A", "CT"), ("M", "MR")):
        (heldout / "test" / site).mkdir(parents=True)
        (heldout / "test" / site / "dataset.toml").write_text(f'[dataset]\nmodality = "{modality}"\n')
    (tmp_path / "dataset.toml").write_text('[dataset]\nmodality = "CT"\n')
    units, display = site_intensity(heldout, "A")
    assert units == HU and display == GrayDisplay(HU, DEFAULT_CT_DISPLAY_WINDOW)
    units, display = site_intensity(heldout, "M")
    assert units == TissueUnits() and display.window is None


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    """Site A a CT site (HU through a fixed window), site B per-volume normalised (MR)."""
    return make_run(tmp_path_factory.mktemp("ct"), n=12, evil=False,
                    units={"A": HU, "B": TissueUnits()}, displays={"A": CT_DISPLAY, "B": FULL_RANGE})


def test_ct_report_states_the_window_and_splits_units(ct_run):
    html = render_report(ct_run)
    assert "A: fixed window [-150, 250] HU (level 50, width 400 HU)" in html
    assert "B: whole normalised range [-1, 1]" in html
    assert "Sites in HU: A" in html and "Sites in norm.: B" in html
    assert "Mean intensity per tissue, generated / real (HU)" in html
    assert "csf: intensity distribution (HU)" in html and "csf: intensity distribution (norm.)" in html


def test_tissue_means_in_hu_match_the_pixels(ct_run):
    tissue = json.loads((ct_run / "samples" / "round_003.tissue.json").read_text())
    real = tissue_means(tissue["A"], "real")
    half = synthetic_split(12)["A"]
    width = 3000.0 / BINS
    for c, name in enumerate(("background", "csf", "gm", "wm")):
        pixels = half.ref_images[:, 0][half.ref_labels == c].clamp(-1, 1).double()
        expected = float(HU.to_physical(pixels.mean().item()))
        assert abs(real[name] - expected) <= width / 2 + 1e-6, (name, real[name], expected)
    # round 3's "generator" is the unblurred conditioning half: its means are near the reference's
    generated = tissue_means(tissue["A"], "generated")
    assert all(abs(generated[k] - real[k]) < 60 for k in real)


def test_brain_report_has_no_window_caption_and_no_hu_table(tmp_path):
    html = render_report(make_run(tmp_path, n=12, evil=False))
    assert "Grey levels" not in html and "Mean intensity per tissue" not in html
    assert "Sites in" not in html and "csf: intensity distribution</text>" in html
    tissue = json.loads((tmp_path / "run" / "samples" / "round_003.tissue.json").read_text())
    assert all(len(tissue[s]["centres"]) == 64 for s in SITES)   # the brain's 64 bins, as before


def test_a_physical_chart_is_cropped_to_where_the_pixels_are():
    density = np.zeros(BINS)
    density[100:111] = 1.0
    entry = {"real": {"gm": density.tolist()}, "generated": {"gm": np.roll(density, 5).tolist()}}
    window = _crop([entry], "gm")
    assert window.start <= 100 and window.stop >= 116 and window.stop - window.start < 25
