"""S's public batches: renderings of public maps, freshly deformed when asked."""

import torch

from medgen.models.segmenter import public_batches
from medgen.sim.random_deformation import RandomDeformation


def _bank(size=32):
    bank = torch.zeros(2, size, size, dtype=torch.long)
    bank[:, 4:28, 4:28] = 1
    bank[:, 8:24, 8:24] = 2
    bank[1, 12:20, 12:20] = 3
    return bank


def test_without_deformation_every_label_map_is_a_bank_map():
    bank = _bank()
    images, labels = public_batches(bank, 8)(torch.Generator().manual_seed(0))
    assert images.shape == (8, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert all(any(torch.equal(m, b) for b in bank) for m in labels)


def test_with_deformation_the_maps_are_new_anatomies_and_the_images_follow_them():
    bank = _bank()
    before = bank.clone()
    images, labels = public_batches(bank, 8, deformation=RandomDeformation())(torch.Generator().manual_seed(0))
    assert torch.equal(bank, before)
    assert not any(torch.equal(m, b) for m in labels for b in bank)

    # the images are renderings of the deformed maps, not of the bank's: where the
    # deformation turned brain into background the image is dark, and bright where it
    # turned background into brain (the bank here is a single map)
    one = bank[:1]
    images, labels = public_batches(one, 8, deformation=RandomDeformation(shift_px=3.0))(
        torch.Generator().manual_seed(1))
    for image, label in zip(images[:, 0], labels):
        lost, gained = (label == 0) & (one[0] > 0), (label > 0) & (one[0] == 0)
        if lost.any() and gained.any():
            assert image[lost].mean() < image[gained].mean()
