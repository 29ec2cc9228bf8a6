"""The metric sanity suite on REAL simulated scans: every headline metric must score every
degradation outside the real-vs-real floor's interval, at the sample count the report
calls sufficient; memorisation flags near-copies of training patients and not new ones.

A 2-site brain federation (A and B: the two T1-weighted scanners, the most similar pair,
so "wrong site style" is the hard case) with 256 held-out test subjects per site, 128 per
half (``REQUIRED_SAMPLES``), built once for the module (about a minute on one core).
bench/metric_sanity.py runs the same suite on all sites of both federations and with
every metric; this test keeps the headline claim true as the code changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medgen.data.site_data import load_site
from medgen.evaluation.heldout_split import load_split, split_by_subject
from medgen.evaluation.memorisation import memorisation
from medgen.evaluation.metric_sanity import CANDIDATES, SanitySettings, headline_status, site_sanity
from medgen.evaluation.set_metrics import HEADLINE, REQUIRED_SAMPLES, TissueIntensity, standard_metrics
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

SITES = ("A", "B")
CLASSES = ("background", "csf", "gm", "wm")
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "metric_sanity.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sanity") / "data"
    build_federation(SimConfig(seed=0, sites=",".join(SITES), subjects_per_site=32, public_size=0,
                               heldout_fit=0, heldout_test=2 * REQUIRED_SAMPLES, image_size=64), root)
    return root


@pytest.fixture(scope="module")
def halves(federation):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        test = load_split(federation / "heldout", "test", 64, SITES, federation / "cache")
    finally:
        torch.set_num_threads(previous)
    return {s: split_by_subject(s, test[s]) for s in SITES}


def headline_metrics() -> list:
    """Only the metric objects that produce headline quantities (the others are slower)."""
    produced = {"tissue_bands": TissueIntensity}
    assert set(HEADLINE) <= set(produced), f"add the metric of {set(HEADLINE) - set(produced)} here"
    return [m for m in standard_metrics(CLASSES) if any(isinstance(m, produced[k]) for k in HEADLINE)]


@pytest.mark.parametrize("site", SITES)
def test_every_headline_metric_sees_every_degradation_of_real_images(halves, site):
    result = site_sanity(site, halves, headline_metrics(),
                         SanitySettings(samples=REQUIRED_SAMPLES, bootstrap=200, degraded_bootstrap=1))
    assert result["samples"] == REQUIRED_SAMPLES
    assert set(result["degradations"]) >= {"blur", "noise", "texture_removal", "bias_field", "intensity_remap",
                                           "collapse_one", "collapse_few", "duplicates", "wrong_site"}
    missed = {(name, key): (entry["scores"][key]["value"], result["floor"][key])
              for name, entry in result["degradations"].items() for key in HEADLINE
              if not entry["scores"][key]["seen"]}
    assert not missed, f"headline metrics at the floor for degraded real images: {missed}"
    assert result["degradations"]["wrong_site"]["other_site"] == ({"A": "B", "B": "A"}[site])


def test_headline_status_names_every_miss():
    fake = {"brain": {"sites": {"A": {"degradations": {
        "blur": {"scores": {"swd": {"seen": True}, "psd": {"seen": True}}},
        "duplicates": {"scores": {"swd": {"seen": False}, "psd": {"seen": True}}}}}}}}
    status = headline_status(fake, candidates=("swd", "psd", "coverage"))
    assert status["psd"]["headline"] and not status["swd"]["headline"]
    assert status["swd"]["missed"] == ["brain/A/duplicates"]
    assert not status["coverage"]["headline"] and status["coverage"]["checks"] == 0  # never measured


def test_the_declared_headline_is_what_the_bench_measured():
    assert RESULTS.exists(), "bench/results/metric_sanity.json is committed; regenerate it with python -m bench.metric_sanity"
    measured = json.loads(RESULTS.read_text())
    assert set(measured["federations"]) >= {"brain", "head-ct"}
    assert tuple(measured["headline"]) == HEADLINE
    assert set(measured["status"]) == set(CANDIDATES)


def test_memorisation_flags_near_copies_of_training_patients_and_not_new_patients(federation, halves):
    training = load_site(federation / "sites" / "A", 64).images
    half = halves["A"]
    n = min(len(training), 32)
    copies = (training[:n] + 0.02 * torch.randn(training[:n].shape, generator=torch.Generator().manual_seed(0)))
    copied = memorisation(copies.clamp(-1, 1), training, half.ref_images, half.cond_images[n:2 * n])
    new = memorisation(half.cond_images[:n], training, half.ref_images, half.cond_images[n:2 * n])
    assert copied["copy_rate"] == 1.0 and copied["median_ratio"] < 0.3
    assert new["copy_rate"] <= 0.25 and new["median_ratio"] > 0.8
