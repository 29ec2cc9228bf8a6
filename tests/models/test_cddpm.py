"""cddpm: per-sample gradients of the private UNet against the autograd oracle (channels_last
included), noise multiplicity as ONE gradient per record, DDIM exactness, local training
through PrivateTraining, and site style of samples judged by a site classifier."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from medgen.config import ConfigError, RunConfig
from medgen.evaluation.networks import TrainSettings, train_site_classifier
from medgen.models.blocks import one_hot_labels
from medgen.models.cddpm import (ConditionalDDPM, ddim_step, ddim_timesteps, record_losses,
                                 training_target)
from medgen.models.recipe import RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

torch.set_num_threads(1)
SIZE, N = 16, 6


def recipe(**options) -> ConditionalDDPM:
    options = {"channels": "8,16", "norm-groups": 4, **options}
    return ConditionalDDPM(RunConfig(recipe="cddpm", image_size=SIZE, batch_size=4, sites="A,B,C",
                                     options=options))


def batch(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1,
            torch.randint(0, 4, (n, SIZE, SIZE), generator=g))


def plan(sigma=1.0, clip=1.0, q=1.0, releases=()):
    return PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=q,
                       total_steps=1000, noise_multiplier=sigma, max_grad_norm=clip, releases=releases)


def train(r, model, data, private, site, steps, state, seed=0):
    """One round of ``train_local`` as the node runs it (a RoundContext; no public data)."""
    return r.train_local(model, RoundContext(data, None, private, site, steps, state, "cpu", seed))


def wrap(r, model, images, labels):
    mode = "no_op" if r.options.grad_sample_mode == "vmap" else "hooks"
    private = PrivateTraining(plan(), [], seed=0)
    wrapped, dp_opt, _ = private.make_private(model.denoiser, torch.optim.SGD(model.denoiser.parameters(), lr=0.1),
                                              TensorDataset(images, labels), len(images), grad_sample_mode=mode)
    return private, wrapped, dp_opt


def oracle(r, wrapped, images, labels, site_index, seed):
    """Per-record autograd loop over the SAME noise draws the fast path used."""
    x_t, t, target = r.draw_training_noise(images, torch.Generator().manual_seed(seed))
    cond = one_hot_labels(labels, 4)
    site = torch.full((len(images),), site_index)
    return per_sample_grads_reference(
        wrapped, lambda m, *record: record_losses(m, *record)[0], x_t, cond, site, t, target)


def emit_channels_last(model):
    """Every conv of the UNet receives a channels_last input, as when an upstream block
    (MONAI's attention, a loader) emits such views. Registered BEFORE make_private, so
    PrivateTraining's contiguity guard (installed later) runs after these hooks."""
    def hook(_module, args):
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return [m.register_forward_pre_hook(hook) for m in model.denoiser.modules()
            if isinstance(m, torch.nn.Conv2d)]


def max_rel_error(fast, ref):
    return max(float((f - g).norm() / g.norm().clamp_min(1e-12)) for f, g in zip(fast, ref))


@pytest.mark.parametrize("mode,draws", [("hooks", 1), ("vmap", 1), ("vmap", 3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("prior", [False, True])
def test_private_unet_per_sample_grads_match_the_autograd_oracle(mode, draws, channels_last, prior):
    r = recipe(**{"grad-sample-mode": mode, "noise-draws": draws, "tissue-prior": prior})
    model = r.build()
    if prior:  # a non-zero table, so the prior's gradient paths through the UNet input count
        with torch.no_grad():
            model.denoiser.tissue_offset.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            model.denoiser.blur_raw.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    images, labels = batch()
    fed = images
    if channels_last and mode == "hooks":
        emit_channels_last(model)  # before make_private, as a real upstream source would be
    elif channels_last:  # torch.func cannot even form channels_last views inside vmap
        fed = images.contiguous(memory_format=torch.channels_last)
    private, wrapped, _ = wrap(r, model, images, labels)
    r.private_backward(model.denoiser, wrapped, fed, labels, 1, torch.Generator().manual_seed(7))
    fast = [p.grad_sample.clone() for p in model.denoiser.parameters()]
    assert all(g.shape[0] == N for g in fast)  # one gradient per RECORD, never per draw
    ref = oracle(r, wrapped, images, labels, 1, seed=7)
    assert max_rel_error(fast, ref) < 1e-4
    if prior:  # the tables are among the private parameters, and only the record's site row moves
        for weight in model.denoiser.prior_parameters():
            table = [g for g, p in zip(fast, model.denoiser.parameters()) if p is weight][0]
            assert table[:, 1].abs().sum() > 0 and table[:, [0, 2]].abs().sum() == 0
    private.close()


def test_channels_last_inputs_reach_the_convs_and_break_unguarded_hooks():
    """The oracle test above exercises the bug: without the guard, hooks mode is wrong."""
    r = recipe(**{"grad-sample-mode": "hooks"})
    model = r.build()
    images, labels = batch()
    x_t, t, target = r.draw_training_noise(images, torch.Generator().manual_seed(3))
    cond = one_hot_labels(labels, 4)
    emit_channels_last(model)
    site = torch.zeros(N, dtype=torch.long)
    unguarded = GradSampleModule(model.denoiser)
    record_losses(unguarded, x_t, cond, site, t, target).mean().backward()
    fast = [p.grad_sample.clone() for p in model.denoiser.parameters()]
    ref = per_sample_grads_reference(unguarded, lambda m, *rec: record_losses(m, *rec)[0],
                                     x_t, cond, site, t, target)
    unguarded._close()
    assert max_rel_error(fast, ref) > 1e-2


def test_a_record_loss_is_the_mean_of_its_draws_computed_one_by_one():
    r = recipe(**{"noise-draws": 3})
    model = r.build()
    images, labels = batch(n=2)
    x_t, t, target = r.draw_training_noise(images, torch.Generator().manual_seed(0))
    cond, site = one_hot_labels(labels, 4), torch.tensor([0, 2])
    losses = record_losses(model.denoiser, x_t, cond, site, t, target)
    for i in range(2):
        singles = [record_losses(model.denoiser, x_t[i:i + 1, k:k + 1], cond[i:i + 1], site[i:i + 1],
                                 t[i:i + 1, k:k + 1], target[i:i + 1, k:k + 1]) for k in range(3)]
        assert torch.allclose(losses[i], torch.cat(singles).mean(), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_with_a_perfect_denoiser_lands_exactly_on_the_data(prediction):
    r = recipe(prediction=prediction, **{"sample-steps": 7, "tissue-prior": prediction == "sample"})
    x0 = torch.rand(3, 1, SIZE, SIZE) * 1.8 - 0.9
    x = torch.randn(3, 1, SIZE, SIZE)
    steps = ddim_timesteps(r.options.train_timesteps, 7)
    assert steps[0] == r.options.train_timesteps - 1 and steps[-1] == 0 and len(steps) == 7
    for i, t in enumerate(steps):
        abar = r.abar[t].float()
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise that explains x_t exactly
        out = training_target(x0, eps, abar, prediction)
        prev = float(r.abar[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        x = ddim_step(out, x, float(abar), prev, prediction)
    assert torch.allclose(x, x0, atol=1e-4)


def test_options_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match="noise-draws"):
        recipe(**{"grad-sample-mode": "hooks", "noise-draws": 2})
    with pytest.raises(ConfigError, match="options.channels"):
        recipe(channels="16,x")
    with pytest.raises(ConfigError, match="norm-groups"):
        recipe(channels="6,12")
    with pytest.raises(ConfigError, match="no option 'widht'"):
        recipe(widht=3)


@pytest.mark.parametrize("prior", [False, True])
def test_site_rows_are_declared_site_indexed(prior):
    """Row k of the site embedding (and of the tissue prior) is trained at site k only; the
    recipe must say so, or the server's FedAvg shrinks each site's update K-fold."""
    r = recipe(**{"tissue-prior": prior})
    state = r.build().state_dict()
    wanted = {"denoiser.unet.class_embedding.weight", "denoiser.tissue_offset.weight",
              "denoiser.blur_raw.weight"} if prior else {"denoiser.class_embedding.weight"}
    released = {"denoiser.site_moments"} if prior else set()  # the scanner-moment release, by site
    assert set(r.site_indexed_keys) == wanted | released
    assert all(state[k].shape[0] == r.num_sites == 3 for k in r.site_indexed_keys)
    # and every other shared key has no site-sized table that escaped the list
    embeddings = {f"denoiser.{n}.weight" for n, m in r.build().denoiser.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
    assert embeddings == wanted


@pytest.mark.parametrize("prior", [False, True])
def test_one_fedavg_round_takes_each_site_row_from_its_own_site(prior):
    """The server's arithmetic (FedAvg, then site_rows_from_own_site with the recipe's keys,
    as server/strategy.py and bench/federated_vs_central.py do) after real local DP rounds."""
    import numpy as np

    from flwr.app import Array, ArrayRecord

    from medgen.server.strategy import AcceptedReply, site_rows_from_own_site, specs_of, weighted_average

    r = recipe(**{"tissue-prior": prior})
    global_model = r.build()
    current = {k: v.numpy().copy() for k, v in r.shared_state(global_model).items()}
    replies = []
    for site in range(3):
        local = copy.deepcopy(global_model)
        images, labels = batch(seed=site, n=8)
        private = PrivateTraining(plan(q=0.5, releases=r.one_off_releases()), [], seed=site)
        train(r, local, TensorDataset(images, labels), private, site, 2, {}, seed=site)
        replies.append(AcceptedReply(site="ABC"[site], num_examples=8.0, metrics={},
                                     arrays={k: v.numpy().copy() for k, v in r.shared_state(local).items()}))
    specs = specs_of(ArrayRecord({k: Array(v) for k, v in current.items()}))
    averaged = weighted_average(replies, specs)
    merged = site_rows_from_own_site(averaged, replies, current, r.site_indexed_keys, ("A", "B", "C"))
    tables = [f"denoiser.{n}.weight" for n, m in global_model.denoiser.named_modules()
              if isinstance(m, torch.nn.Embedding)]  # every [num_sites, ...] table of the UNet
    assert len(tables) == (3 if prior else 1)
    for key in tables:
        for site in range(3):
            own = replies[site].arrays[key][site]
            assert np.allclose(merged[key][site], own, atol=1e-6)
            assert not np.allclose(averaged[key][site], own, atol=1e-6)  # what plain FedAvg did
    rest = [k for k in current if k not in r.site_indexed_keys]
    assert all(np.array_equal(merged[k], averaged[k]) for k in rest)


def test_tissue_prior_is_exactly_the_unet_at_zero_and_shifts_x0_by_the_table():
    r = recipe(**{"tissue-prior": True, "prior-blur": False})
    plain = ConditionalDDPM(RunConfig(recipe="cddpm", image_size=SIZE, batch_size=4, sites="A,B,C",
                                      options={"channels": "8,16", "norm-groups": 4,
                                               "tissue-prior": False})).build()
    model = r.build()
    model.denoiser.unet.load_state_dict(plain.denoiser.state_dict())
    with torch.no_grad():  # MONAI zero-initialises the output conv: make the UNet non-trivial
        for p in list(plain.parameters()) + list(model.denoiser.unet.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images, labels = batch(n=3)
    cond, site, t = one_hot_labels(labels, 4), torch.tensor([0, 1, 2]), torch.tensor([999, 500, 0])
    x = torch.cat([images, cond], dim=1)
    assert torch.allclose(model.denoiser(x, t, class_labels=site), plain.denoiser(x, t, class_labels=site))
    with torch.no_grad():
        model.denoiser.tissue_offset.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
    prior = torch.arange(12.0).view(3, 4)[site][torch.arange(3)[:, None, None], labels] / 10
    shifted = torch.cat([images - r.abar[t].sqrt().float().view(-1, 1, 1, 1) * prior[:, None], cond], dim=1)
    expected = prior[:, None] + plain.denoiser(shifted, t, class_labels=site)
    assert torch.allclose(model.denoiser(x, t, class_labels=site), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="tissue-prior"):
        recipe(**{"tissue-prior": True, "prediction": "epsilon"})


def test_prior_blur_keeps_constants_and_widens_with_its_site_sigma():
    denoiser = recipe(**{"tissue-prior": True}).build().denoiser
    with torch.no_grad():
        denoiser.blur_raw.weight.copy_(torch.tensor([[-20.0], [0.0], [2.0]]))  # sigma 0.25, 0.94, 2.38
    site = torch.tensor([0, 1, 2])
    flat = torch.full((3, 1, SIZE, SIZE), 0.7)
    assert torch.allclose(denoiser._blur(flat, site), flat, atol=1e-6)  # borders renormalised
    point = torch.zeros(3, 1, SIZE, SIZE)
    point[:, :, 8, 8] = 1.0
    out = denoiser._blur(point, site)
    assert torch.allclose(out.sum(dim=(1, 2, 3))[:2], torch.ones(2), atol=1e-4)  # far from borders: mass kept
    assert float(out[0, 0, 8, 8]) > 0.99 and float(out[1, 0, 8, 8]) > float(out[2, 0, 8, 8]) > 0
    spread = [float((out[i, 0, 8] * (torch.arange(SIZE) - 8.0) ** 2).sum() / out[i, 0, 8].sum()) for i in (1, 2)]
    assert spread[0] == pytest.approx(0.94 ** 2, rel=0.1) and spread[1] == pytest.approx(2.38 ** 2, rel=0.1)


def test_registered_and_everything_travels():
    r = build_recipe(RunConfig(recipe="cddpm", image_size=SIZE, options={"channels": "8,16", "norm-groups": 4}))
    model = r.build()
    assert r.private_modules == ("denoiser",)
    assert r.shared_keys(model) == list(model.state_dict())
    assert all(k.startswith("denoiser.") for k in model.state_dict())


def test_train_local_takes_exactly_the_steps_and_returns_no_private_losses():
    r = recipe()
    model = r.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = batch(n=12)
    private = PrivateTraining(plan(q=1 / 3, releases=r.one_off_releases()), [], seed=0)
    state: dict = {}
    metrics = train(r, model, TensorDataset(images, labels), private, 2, 3, state)
    assert private.steps_taken == 3
    assert private.history == [(3.0, 1.0, 1), (1.0, 1 / 3, 3)]  # the moment release, then 3 DP steps
    assert metrics["denoiser_steps"] == 3
    assert not any("loss" in k for k in metrics)  # private-batch losses never leave the site
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert state["rounds_trained"] == 1 and "opt_denoiser" in state
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_sampling_is_seeded_and_follows_the_label_map():
    r = recipe(**{"sample-steps": 4})
    model = r.build()
    with torch.no_grad():  # MONAI zero-initialises the output conv: make the map matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _, labels = batch(n=4)
    site = torch.tensor([0, 1, 2, 0])
    a = r.sample(model, labels, site, torch.Generator().manual_seed(5))
    b = r.sample(model, labels, site, torch.Generator().manual_seed(5))
    c = r.sample(model, labels.flip(-1), site, torch.Generator().manual_seed(5))
    assert a.shape == (4, 1, SIZE, SIZE) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="site ids"):
        r.sample(model, labels, torch.tensor([0, 1, 2, 3]))


# -- site style: a tiny model trained for the test, judged by a site classifier ---------
CONTRAST = torch.tensor([[-1.0, 0.9, 0.1, -0.5],   # site 0: bright CSF, dark WM (T2-like)
                         [-1.0, -0.5, 0.1, 0.9]])  # site 1: the reverse (T1-like)


def blob_maps(n, seed):
    """Label maps of nested squares (WM core, GM ring, CSF ring) at random places and sizes."""
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


@pytest.mark.slow
def test_samples_come_out_in_the_requested_sites_style():
    """Two sites with opposite contrasts, federated like the real thing (local DP rounds from
    the global model, then FedAvg); a site classifier trained on real images must put the
    samples of each requested site in that site. Three rounds (it was six, ~85 s of CPU):
    measured with this seed, the classifier put 100% of both sites' samples in their site
    after 3 rounds as after 6 (threshold 90%), and the mean distance to the site's true
    rendering was 0.036/0.073 after 3 rounds, 0.036/0.051 after 6 (threshold 0.25)."""
    cfg = RunConfig(recipe="cddpm", image_size=SIZE, batch_size=32, sites="A,B", seed=1,
                    options={"channels": "16,32", "norm-groups": 8, "sample-steps": 10, "lr": 3e-3,
                             "grad-sample-mode": "hooks"})
    r = ConditionalDDPM(cfg)
    model, states, released = r.build(), [{}, {}], [[], []]
    data = [TensorDataset(render(blob_maps(64, 10 + s), s, 20 + s), blob_maps(64, 10 + s)) for s in (0, 1)]
    for rnd in range(3):
        replies = []
        for site in (0, 1):
            local = copy.deepcopy(model)
            private = PrivateTraining(plan(sigma=0.05, clip=10.0, q=0.5, releases=r.one_off_releases()),
                                      [], seed=2 * rnd + site, released=released[site])
            train(r, local, data[site], private, site, 20, states[site], seed=2 * rnd + site)
            released[site] = released[site] + list(private.new_releases)  # the ledger's store
            replies.append(local.state_dict())
        averaged = {k: (replies[0][k] + replies[1][k]) / 2 for k in replies[0]}
        for key in r.site_indexed_keys:  # as the server does: row k from site k's reply
            averaged[key] = torch.stack([replies[k][key][k] for k in (0, 1)])
        model.load_state_dict(averaged)
    real_maps = blob_maps(64, seed=99)
    real = torch.cat([render(real_maps[:32], 0, 1), render(real_maps[32:], 1, 2)])
    classifier = train_site_classifier(real, torch.arange(64) // 32, 2,
                                       TrainSettings(steps=60, widths=(8, 16), lr=3e-3), seed=0)
    maps = blob_maps(32, seed=123)
    for site in (0, 1):
        fake = r.sample(model, maps, torch.full((32,), site), torch.Generator().manual_seed(site))
        accuracy = float((classifier.predict(fake) == site).float().mean())
        assert accuracy >= 0.9, f"site {site}: classifier accuracy {accuracy:.2f} on samples"
        # and the anatomy is the conditioning map's: close to that site's true rendering
        assert float((fake - render(maps, site, 0)).abs().mean()) < 0.25


@pytest.mark.slow
def test_two_federated_rounds_on_tiny_images_then_tstr_utility(tiny_federation, tmp_path, simulate):
    """`medgen-server simulate --set recipe=cddpm`: 2 rounds, 2 sites, 32 px, through Flower;
    then the TSTR utility of the final checkpoint lands in the run dir. Per-round evaluation
    is off (eval-every=0): nothing here reads it, and it cost this test the training of the
    evaluation networks (~14 s of CPU) plus three evaluations; the TSTR step still samples
    the final checkpoint with the recipe, and tests/test_simulation.py covers evaluation."""
    import json

    from medgen.evaluation.utility import UtilitySettings, run_utility
    from medgen.server.checkpoint import load_checkpoint

    out = tmp_path / "run"
    trains = simulate(tiny_federation, out, ["recipe=cddpm", "num-rounds=2", "local-steps=2", "image-size=32",
                                             "batch-size=4", "accountant=rdp", "target-epsilon=8.0",
                                             "eval-every=0", "options.channels=8,16",
                                             "options.norm-groups=4", "options.sample-steps=3"], timeout=1500)
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None and checkpoint.server_round == 2
    assert set(checkpoint.shared_state) == set(ConditionalDDPM(
        RunConfig.from_toml(out / "config.toml")).build().state_dict())
    assert [t["round"] for t in trains] == [1, 2]
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6  # spent per round, never past the cap
    utility = run_utility(out, per_site=4, settings=UtilitySettings(steps=5, channels=(8, 16)))
    saved = json.loads((out / "utility.json").read_text())
    assert saved["counts"]["A"] == {"synthetic": 4, "real": 4, "test": 6}
    assert set(saved["dice"]["synthetic"]) == {"A", "B"} and saved["recipe"] == "cddpm"
    assert utility["server_round"] == 2


def test_moment_release_is_spent_once_and_starts_the_prior_at_the_released_means():
    """Round 1 releases the site's tissue statistics (one Gaussian mechanism, accounted) and
    sets that site's prior row to the means they imply; round 2 reuses it and spends nothing."""
    from medgen.models.scanner_moments import moments_from_release

    r = recipe(**{"prior-blur": False})
    assert r.one_off_releases() == ((3.0, 1.0, 1),)
    model = r.build()
    images, labels = batch(n=12)
    data = TensorDataset(images, labels)
    seen = {}
    original = type(model.denoiser).start_from_release

    def spy(denoiser, site):
        original(denoiser, site)
        seen["row"] = denoiser.tissue_offset.weight[site].detach().clone()

    type(model.denoiser).start_from_release = spy
    try:
        private = PrivateTraining(plan(releases=r.one_off_releases()), [], seed=0)
        state: dict = {}
        train(r, model, data, private, 1, 1, state)
    finally:
        type(model.denoiser).start_from_release = original
    (release,) = private.new_releases  # what the ledger stores with the round's commit
    released = torch.tensor(release.values, dtype=torch.float32)
    assert torch.equal(model.denoiser.site_moments[1], released)
    assert torch.allclose(seen["row"], moments_from_release(released)[:4])
    assert model.denoiser.site_moments[0].abs().sum() == 0  # other sites' rows untouched
    # round 2, same node state: the release is reused, the history gains only the DP step
    second = PrivateTraining(plan(releases=r.one_off_releases()), list(private.history), seed=1,
                             released=private.new_releases)
    train(r, model, data, second, 1, 1, state, seed=1)
    q = private.history[-1][1]
    assert private.history == [(3.0, 1.0, 1), (1.0, q, 1)]
    assert second.history == [(3.0, 1.0, 1), (1.0, q, 2)]  # one more DP step, no second release
    assert torch.equal(model.denoiser.site_moments[1], released)
