import numpy as np
import pytest

from medgen.sim.physics import (PRESETS, default_site, dequantise, quantise, render_clean,
                                render_scan, site_physics)
from medgen.sim.subjects import deform_subject


@pytest.fixture(scope="module")
def subject(anatomy_32):
    return deform_subject(anatomy_32, seed=5, image_size=32)


def _tissue_means(image, labels):
    return [float(image[labels == k].mean()) for k in (1, 2, 3)]  # CSF, GM, WM


def test_site_contrasts_differ_as_intended(anatomy_32, subject):
    means = {}
    for kind in "ABCD":
        clean = render_clean(subject.maps, site_physics(kind), anatomy_32.tissue_t1,
                             anatomy_32.pixel_mm, 32)
        means[kind] = _tissue_means(clean, subject.labels)
    for kind in "AB":  # T1w: CSF dark, WM bright
        csf, gm, wm = means[kind]
        assert csf < gm < wm, (kind, means[kind])
    for kind in "CD":  # T2w and PD flip it
        csf, gm, wm = means[kind]
        assert csf > gm > wm, (kind, means[kind])
    # B's gamma 1.8 darkens grey matter relative to white matter compared with A
    assert means["B"][1] / means["B"][2] < means["A"][1] / means["A"][2]


def test_severity_zero_is_site_a_and_one_is_the_preset():
    a, preset = PRESETS["A"], PRESETS["D"]
    at0, at1, mid = site_physics("D", 0.0), site_physics("D", 1.0), site_physics("D", 0.5)
    for field in ("gamma", "mix", "blur_mm", "downsample", "gibbs", "bias", "noise"):
        assert getattr(at0, field) == pytest.approx(getattr(a, field))
        assert getattr(at1, field) == pytest.approx(getattr(preset, field))
        assert getattr(mid, field) == pytest.approx((getattr(a, field) + getattr(preset, field)) / 2)
    with pytest.raises(ValueError, match="severity"):
        site_physics("B", 1.5)


def test_extra_sites_interpolate_presets():
    assert [default_site(i, "x") for i in range(4)] == [("A", 1.0), ("B", 1.0), ("C", 1.0), ("D", 1.0)]
    kinds = [default_site(i, "x") for i in range(4, 10)]
    assert [k for k, _ in kinds] == ["B", "C", "D", "B", "C", "D"]
    assert [t for _, t in kinds] == pytest.approx([1 / 2] * 3 + [2 / 3] * 3)


def test_bias_field_is_drawn_per_scan(anatomy_32, subject):
    # without noise, two scans of one anatomy differ only by their bias fields: those must
    # differ (MONAI's coeff_range=(b, b) would give every scan the same field)
    physics = site_physics("B").__class__(**{**site_physics("B").to_dict(), "noise": 0.0})
    args = (subject.maps, physics, anatomy_32.tissue_t1, anatomy_32.pixel_mm, 32)
    first, second, again = render_scan(*args, 1), render_scan(*args, 2), render_scan(*args, 1)
    np.testing.assert_array_equal(first, again)
    brain = subject.labels > 0
    ratio = first[brain].astype(float) / np.maximum(second[brain].astype(float), 1)
    assert ratio.std() > 0.02


def test_noise_level_follows_the_site(anatomy_32, subject):
    background = subject.labels == 0
    spreads = {}
    for kind in "AD":
        physics = site_physics(kind)
        scan = dequantise(render_scan(subject.maps, physics, anatomy_32.tissue_t1,
                                      anatomy_32.pixel_mm, 32, 3), physics.bits)
        clean = render_clean(subject.maps, physics, anatomy_32.tissue_t1, anatomy_32.pixel_mm, 32)
        spreads[kind] = float(np.std((scan - clean)[background]))
    assert spreads["D"] > 2 * spreads["A"]


def test_quantise_uses_the_site_bit_depth():
    ramp = np.linspace(0, 2, 50, dtype=np.float32)
    q8, q12 = quantise(ramp, 8), quantise(ramp, 12)
    assert q8.dtype == np.uint8 and q8.max() == 255
    assert q12.dtype == np.uint16 and q12.max() == 4095
    np.testing.assert_allclose(dequantise(q12, 12)[:20], ramp[:20], atol=1e-3)
