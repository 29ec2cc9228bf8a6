"""Membership-inference audit: metric oracles, attacks on toy models that do / do not
memorise, and the whole `medgen audit` path over a tiny simulated run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medgen.privacy.audit import (attack_result, nearest_generated_scores, per_patient,
                                  private_network_scores, roc_auc, tpr_at_fpr)


# -- metric oracles ---------------------------------------------------------------------
def brute_force_auc(m, n) -> float:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in m for b in n)
    return wins / (len(m) * len(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 6, size=23).astype(float)  # many ties on purpose
    n = rng.integers(0, 5, size=31).astype(float)
    assert roc_auc(m, n) == pytest.approx(brute_force_auc(m, n), abs=1e-12)


def test_auc_extremes_and_symmetry():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    rng = np.random.default_rng(3)
    m, n = rng.normal(size=40), rng.normal(size=50)
    assert roc_auc(m, n) + roc_auc(n, m) == pytest.approx(1.0)


def test_tpr_at_low_fpr_counts_members_above_the_allowed_false_positives():
    nonmembers = np.arange(200, dtype=float)  # 1 % of 200: two false positives allowed
    members = np.array([198.5, 199.5, 197.0, 500.0])
    tpr, fpr = tpr_at_fpr(members, nonmembers, 0.01)
    assert fpr == pytest.approx(2 / 200) and tpr == pytest.approx(3 / 4)  # above 197
    # fewer than 100 non-members: no false positive allowed at all
    tpr, fpr = tpr_at_fpr(np.array([5.0, 10.0]), np.arange(10, dtype=float), 0.01)
    assert fpr == 0.0 and tpr == pytest.approx(0.5)


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc(np.array([np.nan, 1.0]), np.array([0.0]))


def test_per_patient_means_slices_of_one_patient():
    scores = np.array([1.0, 3.0, 10.0, 2.0])
    assert per_patient(scores, np.array([0, 0, 1, 2])).tolist() == [2.0, 10.0, 2.0]


# -- toy attacks: a memorising discriminator leaks, an untrained one does not ------------
class ToyDisc(nn.Module):
    """The conditional-discriminator convention: (image, one-hot labels, site) -> logit."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(5 * size * size, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, image, labels, site):
        return self.net(torch.cat([image, labels], 1)).squeeze(1)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.disc = ToyDisc()


class ToyRecipe:
    """Declares the MembershipScores capability: the discriminator's logit of a record."""

    name = "toy"

    def membership_scores(self, model, images, labels, site_index):
        onehot = nn.functional.one_hot(labels.long(), 4).permute(0, 3, 1, 2).float()
        return model.disc(images, onehot, torch.full((images.shape[0],), site_index))


def toy_records(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n, 16, 16), generator=g)


def train_memoriser(model: ToyModel, images, labels, steps: int) -> None:
    """D's objective with a PERFECT generator (fakes from the data distribution): the only
    way to lower the loss is to memorise the members."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.disc.parameters(), lr=1e-3)
    for step in range(steps):
        fakes, fake_labels = toy_records(images.shape[0], 1000 + step)
        onehot = lambda y: nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float()
        site = torch.zeros(images.shape[0], dtype=torch.long)
        loss = (nn.functional.softplus(-model.disc(images, onehot(labels), site)).mean()
                + nn.functional.softplus(model.disc(fakes, onehot(fake_labels), site)).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_discriminator_attack_detects_a_memorising_discriminator():
    torch.manual_seed(0)
    members, nonmembers = toy_records(32, 1), toy_records(64, 2)
    model = ToyModel()
    train_memoriser(model, *members, steps=150)
    m = private_network_scores(ToyRecipe(), model, *members, site_index=0)
    n = private_network_scores(ToyRecipe(), model, *nonmembers, site_index=0)
    result = attack_result("discriminator-logit", m, n)
    assert result.auc > 0.9 and result.tpr_at_1pct_fpr > 0.3


def test_discriminator_attack_is_near_chance_on_a_network_that_never_saw_members():
    torch.manual_seed(0)
    model = ToyModel()
    train_memoriser(model, *toy_records(32, 7), steps=150)  # memorised OTHER records
    m = private_network_scores(ToyRecipe(), model, *toy_records(48, 1), site_index=0)
    n = private_network_scores(ToyRecipe(), model, *toy_records(64, 2), site_index=0)
    result = attack_result("discriminator-logit", m, n)
    assert abs(result.auc - 0.5) < 4 * result.auc_null_sd


def test_nearest_generated_detects_copies_and_not_fresh_samples():
    members, _ = toy_records(40, 1)
    nonmembers, _ = toy_records(40, 2)
    copies = members + 0.05 * torch.randn_like(members)
    leak = attack_result("nn", nearest_generated_scores(members, copies),
                         nearest_generated_scores(nonmembers, copies))
    fresh, _ = toy_records(200, 3)
    clean = attack_result("nn", nearest_generated_scores(members, fresh),
                          nearest_generated_scores(nonmembers, fresh))
    assert leak.auc == 1.0 and leak.tpr_at_1pct_fpr == 1.0
    assert abs(clean.auc - 0.5) < 4 * clean.auc_null_sd


def test_capability_check_refuses_a_recipe_without_membership_scores_and_names_it():
    from medgen.models.capabilities import MembershipScores, MissingCapability, require

    class Unknown:
        name = "unknown"
        private_modules = ("denoiser", "encoder")

    with pytest.raises(MissingCapability, match="'unknown' does not declare the MembershipScores "
                                                "capability \\(membership_scores\\)"):
        require(Unknown(), MembershipScores, "the audit")
    assert require(ToyRecipe(), MembershipScores, "the audit") is not None


# -- the whole command over a tiny run directory ---------------------------------------
def test_medgen_audit_over_a_run_directory(tiny_federation, tmp_path, capsys):
    from medgen.client.local_state import LocalState, save_local_state
    from medgen.config import RunConfig
    from medgen.models.registry import build_recipe
    from medgen.privacy.audit_cli import AUDIT_FILE, main
    from medgen.server.checkpoint import new_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    before = {p: p.stat().st_mtime_ns for p in tiny_federation.rglob("*") if p.is_file()}
    runs = []
    for name, eps in (("nodp", 1e7), ("dp", 5.0)):
        run_dir = tmp_path / name
        config = RunConfig(sites="A,B", image_size=32, batch_size=4, target_epsilon=eps,
                           data_root=str(tiny_federation), state_root=str(run_dir / "state"),
                           run_dir=str(run_dir), options={"gen-width": 4, "disc-width": 4, "noise-dim": 8})
        run_dir.mkdir()
        (run_dir / "config.toml").write_text(config.to_toml())
        recipe = build_recipe(config)
        model = recipe.build()
        save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(model), 2, config, "key"))
        for site in config.site_names:
            save_local_state(run_dir / "state" / site / "local_state.pt",
                             LocalState("key", recipe.local_only_state(model), {}))
        (run_dir / "privacy.json").write_text(json.dumps({"max_epsilon": eps}))
        runs.append(run_dir)

    assert main([str(r) for r in runs] + ["--generated", "8"]) == 0
    out = capsys.readouterr().out
    assert "discriminator-logit" in out and "nearest-generated" in out
    for run_dir in runs:
        report = json.loads((run_dir / AUDIT_FILE).read_text())
        assert report["unit"] == "patient" and set(report["sites"]) == {"A", "B"}
        result = report["sites"]["A"]["discriminator-logit"]
        assert result["members"] == 8 and result["nonmembers"] == 12
        assert 0.0 <= result["auc"] <= 1.0 and math.isfinite(result["auc_null_sd"])
        assert set(report["summary"]) == {"discriminator-logit", "nearest-generated",
                                          "conditional-reconstruction"}
        assert len(report["compared_with"]) == 1  # the other run, side by side
    after = {p: p.stat().st_mtime_ns for p in tiny_federation.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before  # input data untouched


def _run_dir(federation, run_dir, recipe_name, options, eps=5.0):
    """A finished run directory as `medgen-server simulate` leaves it (untrained weights)."""
    from medgen.client.local_state import LocalState, save_local_state
    from medgen.config import RunConfig
    from medgen.models.registry import build_recipe
    from medgen.server.checkpoint import new_checkpoint, save_checkpoint

    config = RunConfig(recipe=recipe_name, sites="A,B", image_size=32, batch_size=4, target_epsilon=eps,
                       data_root=str(federation), state_root=str(run_dir / "state"),
                       run_dir=str(run_dir), options=options)
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config.to_toml())
    recipe = build_recipe(config)
    model = recipe.build()
    save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(model), 2, config, "key"))
    for site in config.site_names:
        save_local_state(run_dir / "state" / site / "local_state.pt",
                         LocalState("key", recipe.local_only_state(model), {}))
    return run_dir


CDDPM_TINY = {"channels": "8,16", "norm-groups": 4, "train-timesteps": 50, "sample-steps": 2}


def test_medgen_audit_on_a_cddpm_run_scores_the_denoiser(tiny_federation, tmp_path, capsys):
    """cddpm declares MembershipScores by its denoising loss: the audit runs every attack
    (it used to call the denoiser as a conditional discriminator and crash)."""
    from medgen.privacy.audit_cli import AUDIT_FILE, main

    torch.set_num_threads(1)
    run_dir = _run_dir(tiny_federation, tmp_path / "cddpm", "cddpm", CDDPM_TINY)
    assert main([str(run_dir), "--generated", "4"]) == 0
    report = json.loads((run_dir / AUDIT_FILE).read_text())
    result = report["sites"]["B"]["discriminator-logit"]
    assert result["members"] == 8 and 0.0 <= result["auc"] <= 1.0
    assert set(report["summary"]) == {"discriminator-logit", "nearest-generated",
                                      "conditional-reconstruction"}


def test_medgen_audit_refuses_a_recipe_without_the_capability_before_loading(tiny_federation, tmp_path,
                                                                             capsys, monkeypatch):
    from medgen.models.cddpm import ConditionalDDPM
    from medgen.privacy.audit_cli import AUDIT_FILE, main

    run_dir = _run_dir(tiny_federation, tmp_path / "cddpm", "cddpm", CDDPM_TINY)
    monkeypatch.delattr(ConditionalDDPM, "membership_scores")
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "recipe 'cddpm' does not declare the MembershipScores capability" in err
    assert not (run_dir / AUDIT_FILE).exists()


def test_denoising_loss_scores_separate_a_memorised_record():
    """The cddpm score is minus the record's denoising loss: a record the denoiser
    reproduces exactly scores higher than one it does not."""
    from medgen.config import RunConfig
    from medgen.models.cddpm import ConditionalDDPM

    recipe = ConditionalDDPM(RunConfig(recipe="cddpm", image_size=16, sites="A,B",
                                       options={**CDDPM_TINY, "tissue-prior": False}))
    model = recipe.build()
    images, labels = toy_records(4, 0)
    images = images.clamp(-1, 1)
    scores = recipe.membership_scores(model, images, labels, 0)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores <= 0).all()
    # a denoiser that outputs x0 perfectly for record 0 only (x0-prediction): loss 0 there
    copy_first = lambda x, t, class_labels: images[:1].repeat(x.shape[0], 1, 1, 1)  # noqa: E731
    model.denoiser.forward = copy_first
    scores = recipe.membership_scores(model, images, labels, 0)
    assert float(scores[0]) == 0.0 and (scores[1:] < 0).all()


def test_medgen_audit_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    from medgen.privacy.audit_cli import main

    assert main([str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err


def test_audit_summary_joins_privacy_json_for_the_report(tmp_path):
    from medgen.privacy.audit_cli import _into_run_report

    (tmp_path / "privacy.json").write_text(json.dumps({"unit": "patient", "max_epsilon": 3.0}))
    summary = {"discriminator-logit": {"site": "A", "auc": 0.8, "tpr_at_1pct_fpr": 0.2, "auc_null_sd": 0.05}}
    _into_run_report(tmp_path, {"summary": summary})
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["max_epsilon"] == 3.0  # the server's statement is kept
    assert privacy["membership_inference"]["worst_site_per_attack"] == summary
