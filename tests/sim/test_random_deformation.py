"""Random deformations of label maps: new anatomies, no invented labels, input untouched."""

import pytest
import torch

from medgen.sim.random_deformation import RandomDeformation, deform_label_maps

STILL = RandomDeformation(rotation_rad=0.0, scale=0.0, shift_px=0.0, elastic_px=0.0)


def _nested_squares(n=6, size=32):
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, 6:26, 6:26] = 1
    labels[:, 9:23, 9:23] = 2
    labels[:, 12:20, 12:20] = 3
    return labels


def _disc(size=32, radius=10.0):
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2).long() * 3


def test_zero_ranges_are_the_identity():
    labels = _nested_squares()
    assert torch.equal(deform_label_maps(labels, torch.Generator().manual_seed(0), STILL), labels)


def test_default_deformation_moves_boundaries_only_and_keeps_the_input():
    labels = _nested_squares()
    before = labels.clone()
    out = deform_label_maps(labels, torch.Generator().manual_seed(1))
    assert torch.equal(labels, before)
    assert out.dtype == torch.long and out.shape == labels.shape
    assert set(out.unique().tolist()) <= {0, 1, 2, 3}
    changed = (out != labels).float().mean(dim=(1, 2))
    assert (changed > 0.005).all() and (changed < 0.4).all()
    assert not torch.equal(out[0], out[1])  # one deformation per map
    for k in range(4):  # every tissue survives with a similar area (scale +-10 %: area +-21 %)
        ratio = (out == k).sum(dim=(1, 2)).float() / (labels == k).sum(dim=(1, 2)).float()
        assert ((ratio > 0.6) & (ratio < 1.5)).all(), (k, ratio)
    # the interior of the innermost square never leaves its tissue under a few pixels' motion
    assert (out[:, 15:17, 15:17] == 3).all()


def test_rotation_turns_about_the_centre():
    """A centred disc is invariant under rotation about the centre; a square is not."""
    rotate = RandomDeformation(rotation_rad=0.6, scale=0.0, shift_px=0.0, elastic_px=0.0)
    disc = _disc().expand(8, -1, -1)
    square = torch.zeros(8, 32, 32, dtype=torch.long)
    square[:, 8:24, 8:24] = 3
    gen = torch.Generator().manual_seed(2)
    assert (deform_label_maps(disc, gen, rotate) != disc).float().mean() < 0.02
    assert (deform_label_maps(square, gen, rotate) != square).float().mean() > 0.02


def test_shift_moves_the_centroid_by_at_most_its_range():
    shift = RandomDeformation(rotation_rad=0.0, scale=0.0, shift_px=3.0, elastic_px=0.0)
    disc = _disc(radius=6.0).expand(16, -1, -1)
    out = deform_label_maps(disc, torch.Generator().manual_seed(3), shift)
    grid = torch.arange(32).float() + 0.5

    def centroid(maps):
        mass = (maps > 0).float()
        return torch.stack([(mass.sum(2) * grid).sum(1), (mass.sum(1) * grid).sum(1)], 1) / mass.sum((1, 2))[:, None]

    moved = (centroid(out) - centroid(disc)).abs()
    assert (moved <= 3.0 + 0.25).all()
    assert moved.max() > 1.0


def test_deterministic_in_the_generator_and_rejects_bad_input():
    labels = _nested_squares(2)
    a = deform_label_maps(labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, deform_label_maps(labels, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, deform_label_maps(labels, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match=r"\[N,H,W\]"):
        deform_label_maps(labels[0], torch.Generator())
    with pytest.raises(ValueError, match="elastic_cells"):
        RandomDeformation(elastic_cells=1)
    with pytest.raises(ValueError, match=">= 0"):
        RandomDeformation(shift_px=-1.0)
