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


def test_ensemble_probabilities_are_the_mean_of_its_members():
    """Oracle: softmax of the ensemble's output equals the average of the members'
    softmaxes, so predict_probs and Dice-CE see the averaged probabilities."""
    from medgen.models.segmenter import SegmenterSettings, build_segmenter, predict_probs

    settings = SegmenterSettings(channels=(4, 8))
    ensemble = build_segmenter(settings, seed=3, members=3)
    members = [build_segmenter(settings, seed=3 + i) for i in range(3)]
    for member, built in zip(members, ensemble.members):  # member i is seed + i, as documented
        assert all(torch.equal(a, b) for a, b in zip(member.state_dict().values(), built.state_dict().values()))
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    expected = torch.stack([predict_probs(m, x) for m in members]).mean(0)
    assert torch.allclose(predict_probs(ensemble, x), expected, atol=1e-6)
    assert not torch.allclose(predict_probs(members[0], x), expected, atol=1e-3)  # members differ
    assert type(build_segmenter(settings, members=1)).__name__ == "UNet"  # one member: no wrapper
