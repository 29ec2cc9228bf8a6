"""Named latent directions of site-gan's generator (models/controls.py): post-processing of
the released generator, so no Flower test (site-gan's rounds are tested elsewhere).

Mutations tried:
- find_control returning a random unit direction instead of the fitted one:
  test_the_named_direction_changes_contrast_more_than_a_random_one fails.
- find_control ignoring the measure's sign (fitting -score): the same test fails
  (contrast_change < 0).
"""

from __future__ import annotations

import pytest
import torch

from medgen.models.controls import contrast, disentanglement, find_control, foreground_area, traverse
from medgen.models.site_gan import SiteGenerator


def _generator(seed: int = 0) -> SiteGenerator:
    torch.manual_seed(seed)
    return SiteGenerator(image_size=16, num_sites=2, width=4, noise_dim=8, site_dim=2).eval()


def test_measures_on_known_images():
    flat = torch.full((1, 1, 8, 8), -1.0)
    head = flat.clone()
    head[..., 2:6, 2:6] = torch.tensor([0.0, 0.8]).repeat(8)[:16].reshape(4, 4)
    assert float(contrast(flat)) == 0.0 and float(foreground_area(flat)) == 0.0
    assert float(foreground_area(head)) == pytest.approx(16 / 64)
    assert float(contrast(head)) == pytest.approx(0.4)


def test_find_control_is_deterministic_and_unit():
    gen = _generator()
    a = find_control(gen, 1, samples=64, generator=torch.Generator().manual_seed(0))
    b = find_control(gen, 1, samples=64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.direction, b.direction) and a.name == "contrast" and a.site == 1
    assert float(a.direction.norm()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown control"):
        find_control(gen, 1, name="atrophy", samples=64)
    with pytest.raises(ValueError, match="samples"):
        find_control(gen, 1, samples=4)


def test_the_named_direction_changes_contrast_more_than_a_random_one():
    gen = _generator()
    control = find_control(gen, 0, samples=256, generator=torch.Generator().manual_seed(1))
    check = disentanglement(gen, control, samples=32, strength=1.5, generator=torch.Generator().manual_seed(2))
    named, rand = check["named"], check["random"]
    assert named["contrast_change"] > 0
    assert named["contrast_change"] > abs(rand["contrast_change"])
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    dirs = torch.randn(10, 8, generator=torch.Generator().manual_seed(4))
    randoms = [abs(traverse(gen, 0, d / d.norm(), z, 1.5)["contrast_change"]) for d in dirs]
    assert named["contrast_change"] > 2 * sum(randoms) / len(randoms)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(control.apply(z, 2.0) - z, 2.0 * control.direction.expand(4, 8))
