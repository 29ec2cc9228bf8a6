"""The scanner head's per-site point-spread function against SciPy's Gaussian filter."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medgen.models.blocks import ScannerHead


def _head_with_sigmas(sigmas: list[float], radius: int = 4) -> ScannerHead:
    head = ScannerHead(in_channels=2, num_classes=4, num_sites=len(sigmas), blur_radius=radius)
    with torch.no_grad():  # sigma = 0.25 + softplus(raw)  ->  raw = log(expm1(sigma - 0.25))
        head.blur_raw.weight.copy_(torch.log(torch.expm1(torch.tensor(sigmas) - 0.25))[:, None])
    return head


def test_each_sample_is_blurred_with_its_own_sites_sigma_like_scipy():
    sigmas, radius = [0.6, 1.7], 4
    head = _head_with_sigmas(sigmas, radius)
    image = torch.randn(3, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    site = torch.tensor([1, 0, 1])
    out = head._blur(image, site).detach()
    assert torch.allclose(head.blur_sigma(site), torch.tensor([1.7, 0.6, 1.7]), atol=1e-6)
    for i, s in enumerate(site.tolist()):
        # F.pad "reflect" is SciPy's "mirror"; truncate puts the last tap at `radius`
        expected = gaussian_filter(image[i, 0].double().numpy(), sigmas[s], mode="mirror",
                                   truncate=radius / sigmas[s])
        np.testing.assert_allclose(out[i, 0].numpy(), expected, atol=1e-5)


def test_blur_keeps_the_mean_and_a_wider_psf_smooths_more():
    head = _head_with_sigmas([0.5, 2.0])
    image = torch.zeros(2, 1, 17, 17)
    image[:, :, 8, 8] = 1.0  # an impulse: the output is the PSF itself
    out = head._blur(image, torch.tensor([0, 1])).detach()
    assert out.sum(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out[0, 0, 8, 8] > 2 * out[1, 0, 8, 8]  # the sharp site keeps its peak


def test_radius_zero_turns_the_psf_off_and_the_sigma_gets_a_gradient():
    image = torch.randn(2, 1, 8, 8)
    off = _head_with_sigmas([1.0, 1.0], radius=0)
    assert torch.equal(off._blur(image, torch.tensor([0, 1])), image)
    head = _head_with_sigmas([0.5, 1.0])
    head._blur(image, torch.tensor([0, 0])).square().sum().backward()
    grad = head.blur_raw.weight.grad
    assert grad[0, 0] != 0 and grad[1, 0] == 0  # only the site present in the batch moves


def test_tissue_statistics_read_contrast_blur_and_noise():
    from medgen.models.blocks import one_hot_labels, tissue_statistics

    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:8], labels[:, 4:12, 8:12] = 2, 3          # gm | wm inside background
    means = torch.tensor([-1.0, 0.0, 0.2, 0.8])
    image = means[labels].unsqueeze(1)                           # piecewise-constant "scan"
    onehot = one_hot_labels(labels, 4)
    stats = tissue_statistics(image, onehot)[0]
    assert stats[[0, 2, 3]].tolist() == pytest.approx([-1.0, 0.2, 0.8], abs=1e-6)
    assert stats[1] == 0.0                                       # no csf: empty class -> 0, not NaN
    assert stats[4:8].max() < 1e-2                               # constant inside each tissue
    blurred = _head_with_sigmas([1.5])._blur(image, torch.tensor([0])).detach()
    noisy = image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    sharp_s, noise_s = stats[8], stats[9]
    assert tissue_statistics(blurred, onehot)[0, 8] < sharp_s    # blur lowers sharpness
    assert tissue_statistics(noisy, onehot)[0, 9] > noise_s + 0.1  # noise raises the Laplacian term
    assert torch.isfinite(stats).all()
