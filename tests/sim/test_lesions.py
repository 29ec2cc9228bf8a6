"""Lesions in the brain simulator (sim/lesions.py): off by default and then invisible,
deterministic per subject, present at the set rate, their own contrast per scanner, and
declared in the build's label schema (the public bank included)."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.lesions import LESION_CLASS, LesionSpec, has_lesion
from medgen.sim.physics import render_clean, site_physics
from medgen.sim.subjects import deform_subject

# The tiny config of tests/sim/conftest.py built by the code BEFORE lesions existed
# (commit a66e8b5): a default build must stay byte-identical. A deliberate rendering change
# bumps GENERATOR_VERSION and this pin with it.
TINY_CONFIG_HASH = "979307f25bd5551c6ddc625ec4b56d8646b1fe2cb4b8d3852cb33655fbc9b59a"
TINY_CONTENT_HASH = "96a9098a197e229e805edbf8455aef5c20469331a1187727397fcf9666656b39"
LESION = 4  # the class index the lesion build appends after the brain's four


def test_a_build_without_lesions_is_byte_identical_to_the_build_before_lesions(built, tiny_config):
    """Mutation: painting at rate 0, or a lesion field in the config hash, changes the pins."""
    assert tiny_config.config_hash() == TINY_CONFIG_HASH
    assert built.content_hash == TINY_CONTENT_HASH
    assert not (built.root / "dataset.toml").exists()
    other_size = SimConfig(**{**tiny_config.to_dict(), "lesion_size_mm": (1.0, 2.0)})
    assert other_size.config_hash() == TINY_CONFIG_HASH  # size without a rate: no lesions
    assert "lesion_rate" not in tiny_config.to_dict()


def test_lesion_options_refuse_bad_values_naming_the_field():
    with pytest.raises(SimConfigError, match="lesion_rate"):
        SimConfig(lesion_rate=1.5)
    with pytest.raises(SimConfigError, match="lesion_size_mm"):
        SimConfig(lesion_rate=0.5, lesion_size_mm=(10.0, 4.0))
    on = SimConfig(lesion_rate=0.25, lesion_size_mm=(4, 8))
    assert on.lesion_spec() == LesionSpec(0.25, (4.0, 8.0))
    assert SimConfig.from_dict(on.to_dict()) == on and on.config_hash() != SimConfig().config_hash()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_the_fraction_of_patients_with_a_lesion_is_the_set_rate(rate):
    """Mutation: a draw that ignores the rate (or a shared stream) fails the band."""
    n = 4000
    hits = sum(has_lesion(seed, LesionSpec(rate)) for seed in range(n))
    assert abs(hits / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert not any(has_lesion(seed, LesionSpec(0.0)) for seed in range(100))


def test_lesions_are_deterministic_show_in_the_labels_and_leave_other_subjects_unchanged(anatomy_32):
    spec = LesionSpec(0.5, (6.0, 10.0))
    seeds = [s for s in range(40) if has_lesion(s, spec)][:3] + [s for s in range(40) if not has_lesion(s, spec)][:2]
    for seed in seeds:
        plain = deform_subject(anatomy_32, seed, 32)
        one = deform_subject(anatomy_32, seed, 32, spec)
        again = deform_subject(anatomy_32, seed, 32, spec)
        assert np.array_equal(one.labels, again.labels) and np.array_equal(one.maps, again.maps)
        assert one.level == plain.level  # its own stream: the anatomy draw is untouched
        if has_lesion(seed, spec):
            assert one.maps.shape[0] == 5 and (one.labels == LESION).any()
            changed = one.labels != plain.labels
            assert np.all(one.labels[changed] == LESION)  # only the lesion differs
            assert np.all(plain.labels[one.labels == LESION] > 0)  # inside the brain
            brain = one.maps[1:].sum(axis=0)
            assert np.allclose(brain, plain.maps[1:4].sum(axis=0), atol=1e-5)  # tissues give way
        else:
            assert np.array_equal(one.maps, plain.maps) and np.array_equal(one.labels, plain.labels)


def test_the_lesion_has_its_own_contrast_per_scanner(anatomy_32):
    """T1 (A): darker than grey matter; T2 (C): brighter than grey and white matter; PD (D):
    above white matter. Mutation: dropping the lesion term in physics.render_contrast makes
    it render as the tissue it replaced (WM: bright on T1, dark on T2)."""
    spec = LesionSpec(1.0, (12.0, 14.0))
    subject = deform_subject(anatomy_32, 7, 32, spec)
    labels = subject.labels
    for kind, brighter, darker in (("A", [], [2, 3]), ("C", [2, 3], []), ("D", [3], [])):
        image = render_clean(subject.maps, site_physics(kind), anatomy_32.tissue_t1, anatomy_32.pixel_mm, 32)
        lesion = image[labels == LESION].mean()
        for tissue in brighter:
            assert lesion > image[labels == tissue].mean(), (kind, tissue)
        for tissue in darker:
            assert lesion < image[labels == tissue].mean(), (kind, tissue)


@pytest.mark.slow
def test_a_lesion_build_declares_the_class_and_the_public_bank_holds_lesions(tmp_path):
    """The loaders read the class from the build's dataset.toml (no special case): the site,
    the held-out set and the public bank. Mutation: without the schema the loader refuses
    value 4; with the bank built lesion-free it holds no lesion pixel."""
    import torch

    from medgen.data.heldout_data import load_heldout
    from medgen.data.manifest import load_manifest
    from medgen.data.site_data import load_public_bank, load_site
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    config = SimConfig(seed=1, sites="A,C", subjects_per_site=4, public_size=6, heldout_fit=1,
                       heldout_test=1, image_size=32, lesion_rate=0.6)
    manifest = build_federation(config, tmp_path / "data")
    schema = load_manifest(manifest.site_dir("A"), root=manifest.root).labels
    assert schema.names[-1] == LESION_CLASS and schema.num_classes == 5
    site = load_site(manifest.site_dir("C"), 32)
    assert site.schema.names == schema.names and site.images.shape[0] == 4
    heldout = load_heldout(manifest.root, "test", 32)
    assert set(heldout) == {"A", "C"}
    public = load_public_bank(manifest.public_dir, 32)
    assert int((public.label_maps == LESION).any(dim=(1, 2)).sum()) >= 1
    again = build_federation(config, tmp_path / "again")
    assert again.content_hash == manifest.content_hash
