"""TSTR utility: informative synthetic pairs score near real ones, uninformative ones do not;
Dice is the mean over CSF/GM/WM only; counts must match; pairs come from the recipe."""

import pytest
import torch

from medgen.evaluation.utility import (UtilitySettings, mean_tissue_dice, synthetic_pairs, tstr)

torch.set_num_threads(1)
SIZE = 16
CONTRAST = {"A": torch.tensor([-1.0, 0.9, 0.1, -0.5]), "B": torch.tensor([-1.0, -0.5, 0.1, 0.9])}
FAST = UtilitySettings(steps=60, batch_size=16, lr=5e-3, channels=(8, 16))


def blob_maps(n, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        cy, cx = torch.randint(5, SIZE - 5, (2,), generator=g).tolist()
        r = int(torch.randint(3, 6, (1,), generator=g))
        for label, radius in ((1, r + 1), (2, r), (3, max(1, r - 2))):
            maps[i, max(0, cy - radius):cy + radius, max(0, cx - radius):cx + radius] = label
    return maps


def render(maps, site, seed):
    g = torch.Generator().manual_seed(seed)
    return (CONTRAST[site][maps] + 0.05 * torch.randn(maps.shape, generator=g)).clamp(-1, 1).unsqueeze(1)


class Oracle(torch.nn.Module):
    """'Segments' by looking up the true map: logits = one-hot of a stored label map."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels

    def forward(self, images):
        n = images.shape[0]
        out = torch.nn.functional.one_hot(self.labels[:n], 4).permute(0, 3, 1, 2).float()
        self.labels = self.labels[n:]
        return out


def test_mean_tissue_dice_is_one_for_perfect_and_ignores_background():
    maps = blob_maps(4, 0)
    images = render(maps, "A", 0)
    assert mean_tissue_dice(Oracle(maps.clone()), (images, maps)) == pytest.approx(1.0)
    wrong = maps.clone()
    wrong[wrong == 3] = 2  # WM called GM: WM Dice 0, GM Dice < 1, CSF 1
    score = mean_tissue_dice(Oracle(wrong), (images, maps))
    assert 0.3 < score < 0.7


def test_informative_synthetic_pairs_rival_real_ones_and_noise_does_not():
    sites = ("A", "B")
    real = {s: (render(blob_maps(32, 1 + i), s, 2 + i), blob_maps(32, 1 + i)) for i, s in enumerate(sites)}
    test = {s: (render(blob_maps(32, 50 + i), s, 60 + i), blob_maps(32, 50 + i)) for i, s in enumerate(sites)}
    good = {s: (render(blob_maps(32, 10 + i), s, 20 + i), blob_maps(32, 10 + i)) for i, s in enumerate(sites)}
    # images that ignore the map: a segmenter trained on them cannot learn the tissues
    noise = {s: (torch.rand(32, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                 blob_maps(32, 10 + i)) for i, s in enumerate(sites)}
    ok = tstr(good, real, test, FAST, seed=0)
    bad = tstr(noise, real, test, FAST, seed=0)
    assert set(ok["dice"]) == {"synthetic", "real", "real+synthetic"}
    for s in sites:
        assert ok["dice"]["real"][s] > 0.6
        assert ok["ratio"][s] > 0.8
        assert bad["ratio"][s] < 0.6
        assert bad["dice"]["real"][s] == pytest.approx(ok["dice"]["real"][s])  # same seed, same data
    assert ok["counts"]["A"] == {"synthetic": 32, "real": 32, "test": 32}


def test_counts_must_match_and_sites_must_have_test_data():
    maps = blob_maps(4, 0)
    pairs = (render(maps, "A", 0), maps)
    with pytest.raises(ValueError, match="site A: 2 synthetic vs 4 real"):
        tstr({"A": (pairs[0][:2], maps[:2])}, {"A": pairs}, {"A": pairs}, FAST)
    with pytest.raises(ValueError, match=r"\['A'\]"):
        tstr({"A": pairs}, {"A": pairs}, {}, FAST)


def test_synthetic_pairs_label_the_recipes_samples_with_their_conditioning_maps():
    calls = []

    class FakeRecipe:
        def sample(self, model, label_maps, site_index, generator=None):
            calls.append(site_index.clone())
            return label_maps[:, None].float() / 3  # a "generator" that paints the map

    maps = blob_maps(5, 3)
    images, labels = synthetic_pairs(FakeRecipe(), None, maps, 1, seed=0)
    assert torch.equal(labels, maps) and torch.equal(images[:, 0] * 3, maps.float())
    assert torch.equal(calls[0], torch.ones(5, dtype=torch.long))


def test_augmented_arms_are_trained_on_jittered_images(monkeypatch):
    """With ``augment`` every arm's batches pass through acquisition_jitter; without, none do."""
    import medgen.evaluation.utility as utility

    calls = []
    real_jitter = utility.acquisition_jitter

    def counting(images, gen):
        calls.append(images.shape[0])
        return real_jitter(images, gen)

    monkeypatch.setattr(utility, "acquisition_jitter", counting)
    maps = blob_maps(16, 0)
    pairs = {"A": (render(maps, "A", 0), maps)}
    settings = UtilitySettings(steps=5, batch_size=4, lr=5e-3, channels=(8, 16))
    tstr(pairs, pairs, pairs, settings, seed=0)
    assert calls == []
    augmented = UtilitySettings(steps=5, batch_size=4, lr=5e-3, channels=(8, 16), augment=True)
    result = tstr(pairs, pairs, pairs, augmented, seed=0)
    assert calls == [4] * 15  # 3 arms x 5 steps, one jittered batch each
    assert result["settings"]["augment"] is True and augmented.result_file == "utility-augmented.json"
