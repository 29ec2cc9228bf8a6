"""Acquisition jitter: a bias field and noise on top of an image, never its tissue contrast."""

import torch

from medgen.sim.random_contrast import acquisition_jitter


def _flat_tissues(n=8, size=32):
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, 4:28, 4:28] = 1
    labels[:, 8:24, 8:24] = 2
    labels[:, 12:20, 12:20] = 3
    images = torch.tensor([-1.0, -0.2, 0.3, 0.8])[labels].unsqueeze(1)
    return images, labels


def test_jitter_keeps_the_tissue_order_and_changes_the_scan():
    images, labels = _flat_tissues()
    before = images.clone()
    out = acquisition_jitter(images, torch.Generator().manual_seed(0))
    assert torch.equal(images, before)  # input never modified
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    means = torch.stack([torch.stack([out[i, 0][labels[i] == c].mean() for c in range(4)]) for i in range(8)])
    assert (means[:, 1:] > means[:, :-1]).all()  # CSF < GM < WM on every image: contrast kept
    # a multiplicative smooth field: WM is no longer flat, and images differ from one another
    wm = torch.stack([out[i, 0][labels[i] == 3].std() for i in range(8)])
    assert (wm > 0.005).all()
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_jitter_is_deterministic_in_the_generator():
    images, _ = _flat_tissues(2)
    a = acquisition_jitter(images, torch.Generator().manual_seed(3))
    b = acquisition_jitter(images, torch.Generator().manual_seed(3))
    c = acquisition_jitter(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
