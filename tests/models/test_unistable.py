"""unistable (models/unistable.py): the high-contrast renderer of public label maps and the
``--high-contrast`` option of ``medgen pretrain-segmenter``. Public data only (epsilon 0),
so no Flower simulation test: the pretrained S ships through ``options.seg-init``.

Mutations tried:
- render_high_contrast replaced by render_random_contrast (option silently ignored at the
  renderer): test_high_contrast_rendering_separates_tissues_more_than_the_default fails.
- the ``high_contrast`` argument dropped in pretrain (always the plain path):
  test_the_option_reaches_training fails (no high-contrast rendering drawn; same weights).
"""

from __future__ import annotations

import json

import pytest
import torch

import medgen.models.unistable as unistable
from medgen.models.segmenter import SegmenterSettings
from medgen.models.segmenter_pretrain import main, pretrain, provenance_path
from medgen.models.unistable import render_high_contrast, tissue_contrast, unistable_batches
from medgen.sim.random_contrast import render_random_contrast


def _maps(n: int = 12, size: int = 32) -> torch.Tensor:
    """Nested discs: background, csf ring, gm ring, wm core (4 classes)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = []
    for i in range(n):
        r = ((yy - size / 2 - i % 3) ** 2 + (xx - size / 2) ** 2).sqrt()
        outer = size * (0.38 + 0.02 * (i % 4))
        maps.append(torch.where(r < outer * 0.45, 3, torch.where(r < outer * 0.75, 2, torch.where(r < outer, 1, 0))))
    return torch.stack(maps).long()


def test_renderer_is_deterministic_for_a_seed_and_keeps_the_maps():
    maps = _maps()
    before = maps.clone()
    a = render_high_contrast(maps, torch.Generator().manual_seed(3), num_classes=4)
    b = render_high_contrast(maps, torch.Generator().manual_seed(3), num_classes=4)
    c = render_high_contrast(maps, torch.Generator().manual_seed(4), num_classes=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(maps, before)
    assert a.shape == (12, 1, 32, 32) and float(a.min()) >= -1 and float(a.max()) <= 1


def test_high_contrast_rendering_separates_tissues_more_than_the_default():
    maps = _maps(48)
    high = tissue_contrast(render_high_contrast(maps, torch.Generator().manual_seed(0), num_classes=4), maps, 4)
    plain = tissue_contrast(render_random_contrast(maps, torch.Generator().manual_seed(0)), maps, 4)
    assert float(high.median()) > 3 * float(plain.median())
    # every high-contrast image separates its closest pair; the default often does not
    assert float(high.min()) > float(plain.median())
    # tissue order is drawn per image (contrast agnostic): wm is not always the brightest
    images = render_high_contrast(maps, torch.Generator().manual_seed(0), num_classes=4)
    wm_brightest = [float(x[0][m == 3].mean()) > float(x[0][m == 2].mean()) for x, m in zip(images, maps)]
    assert 0 < sum(wm_brightest) < len(wm_brightest)


def test_batches_mix_the_fraction_and_reject_a_bad_one():
    maps = _maps()
    images, labels = unistable_batches(maps, 8, 0.5, num_classes=4)(torch.Generator().manual_seed(0))
    assert images.shape == (8, 1, 32, 32) and labels.shape == (8, 32, 32)
    contrast = tissue_contrast(images, labels, 4)
    assert float(contrast[:4].min()) > float(contrast[4:].median())
    with pytest.raises(ValueError, match="fraction"):
        unistable_batches(maps, 8, 1.5, num_classes=4)


def test_the_option_reaches_training(tiny_federation, tmp_path, monkeypatch):
    calls = []
    real = unistable.render_high_contrast

    def spy(labels, gen, *args, **kwargs):
        calls.append(labels.shape[0])
        return real(labels, gen, *args, **kwargs)

    monkeypatch.setattr(unistable, "render_high_contrast", spy)
    settings = SegmenterSettings(steps=2, batch_size=4, channels=(4, 8))
    public = tiny_federation / "public"
    record = pretrain(public, tmp_path / "H.pt", 2, 32, high_contrast=0.5, settings=settings)
    assert calls == [2, 2] and record["high_contrast"] == 0.5 and record["steps"] == 2
    pretrain(public, tmp_path / "P.pt", 2, 32, settings=settings)
    assert calls == [2, 2]  # the plain S draws none
    high, plain = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "HP")
    assert not all(torch.equal(high[k], plain[k]) for k in high)
    assert main(["--public", str(public), "--out", str(tmp_path / "S.pt"), "--steps", "1",
                 "--image-size", "32", "--high-contrast", "0.25"]) == 0
    assert json.loads(provenance_path(tmp_path / "S.pt").read_text())["high_contrast"] == 0.25
    with pytest.raises(SystemExit):
        main(["--public", str(public), "--out", str(tmp_path / "X.pt"), "--high-contrast", "2"])
