"""The evaluation networks learn what they are for, deterministically."""

from __future__ import annotations

import numpy as np
import torch
from synthetic_heldout import random_anatomy, render

from medgen.evaluation.heldout_split import state_dict_sha256
from medgen.evaluation.networks import (TrainSettings, tissue_fractions, train_feature_net,
                                        train_site_classifier)

FAST = TrainSettings(steps=40, batch_size=16, widths=(8, 16, 16, 32), feature_dim=16)


def two_site_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels, sites = [], [], []
    for i in range(n):
        anatomy = random_anatomy(rng)
        site = ("A", "B")[i % 2]
        images.append(render(anatomy, site, rng) * 2 - 1)
        labels.append(anatomy)
        sites.append(i % 2)
    return (torch.tensor(np.stack(images), dtype=torch.float32)[:, None],
            torch.tensor(np.stack(labels), dtype=torch.long), torch.tensor(sites))


def test_site_classifier_separates_two_synthetic_sites():
    images, _, sites = two_site_set(32, seed=0)
    net = train_site_classifier(images, sites, 2, FAST, seed=0)
    test_images, _, test_sites = two_site_set(20, seed=1)
    assert (net.predict(test_images) == test_sites).float().mean() >= 0.95
    # an untrained classifier of the same architecture is not already right (the test has teeth)
    untrained = train_site_classifier(images, sites, 2, TrainSettings(steps=0, widths=FAST.widths), seed=0)
    assert (untrained.predict(test_images) == test_sites).float().mean() < 0.95


def test_feature_net_training_is_deterministic_and_features_separate_sites():
    images, labels, sites = two_site_set(24, seed=2)
    net_a = train_feature_net(images, labels, sites, 2, FAST, seed=5)
    net_b = train_feature_net(images, labels, sites, 2, FAST, seed=5)
    assert state_dict_sha256(net_a) == state_dict_sha256(net_b)
    assert state_dict_sha256(train_feature_net(images, labels, sites, 2, FAST, seed=6)) != state_dict_sha256(net_a)
    feats = net_a.features(images)
    assert feats.shape == (24, FAST.feature_dim)
    centre_a, centre_b = feats[sites == 0].mean(0), feats[sites == 1].mean(0)
    spread = feats[sites == 0].std(0).norm() + feats[sites == 1].std(0).norm()
    assert (centre_a - centre_b).norm() > spread  # site style is visible in the features


def test_tissue_fractions_sum_to_one_and_count_pixels():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2] = 3
    labels[0, 3, 0] = 1
    assert tissue_fractions(labels).tolist() == [[7 / 16, 1 / 16, 0.0, 8 / 16]]
