"""blind-denoise: the flat-window noise sample, the DP argument, the label-free node round
(accounting equal to Opacus' own), and two Flower rounds.

Mutations each test was run against (and failed under):
- flat windows: choosing a window with a clipped pixel, or not removing its mean;
- per-record gradients: D's real loss per window instead of per record (N*K gradients),
  or a record's loss reading another record's windows;
- public-only updates: the denoiser's clean images taken from the private batch (its
  weights then differ between two datasets); G's step without ``assert_released``;
- accounting: a fresh history each round (the ledger's epsilon then falls below Opacus');
- the noise GAN's grain: G's kernel not normalised (its std then moves with its shape), one
  kernel for every site (site A's grain leaks into site B), D blind to the lags
  (``LAGS = ()``: G then learns no correlation from correlated real noise).
"""

from __future__ import annotations

import json
import shutil
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.client.app import SITE_DATA_REFUSED, app
from medgen.config import ConfigError, RunConfig
from medgen.models.blind_denoise import BlindDenoise, record_disc_losses
from medgen.models.capabilities import SiteDataRefused
from medgen.models.degradations import flat_noise_patches, gaussian_kernel
from medgen.models.noise_gan import second_order_features
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import per_record_grads
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

torch.set_num_threads(1)
SIZE, N = 16, 6
TINY = {"denoiser-width": 8, "denoiser-depth": 3, "denoiser-steps": 2, "gen-kernel": 3, "disc-width": 8}


def recipe(**options) -> BlindDenoise:
    return BlindDenoise(RunConfig(recipe="blind-denoise", image_size=SIZE, batch_size=4, sites="A,B,C",
                                  options={**TINY, **options}))


def images(seed=0, n=N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.rand(n, 1, 1, 1, generator=g) + 0.03 * torch.randn(n, 1, SIZE, SIZE, generator=g))


def plan(sigma=1.0, q=1.0):
    return PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=q,
                       total_steps=1000, noise_multiplier=sigma, max_grad_norm=1.0, releases=())


def train(r, model, x, private, steps=2, seed=0, state=None):
    data = TensorDataset(x, torch.zeros(len(x), SIZE, SIZE, dtype=torch.long))
    public = PublicData(torch.randint(0, 4, (5, SIZE, SIZE), generator=torch.Generator().manual_seed(3)))
    ctx = RoundContext(data, public, private, 1, steps, {} if state is None else state, "cpu", seed)
    return r.train_local(model, ctx)


# -- the real noise sample -----------------------------------------------------------
def test_flat_windows_are_the_flattest_unclipped_ones_minus_their_mean():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 1, SIZE, SIZE)
    image[..., :, :8] = torch.linspace(-0.6, 0.6, SIZE)[:, None]  # a ramp: structure on the left
    image[..., :8, 8:] = -1.0                                        # clipped (CT air at the window edge)
    noise = 0.02 * torch.randn(1, 1, SIZE, SIZE, generator=g)
    noisy = image + noise
    noisy[..., :8, 8:] = -1.0
    patches, valid = flat_noise_patches(noisy, patch=4, count=3, blur_px=1.0)
    assert patches.shape == (1, 3, 1, 4, 4) and torch.equal(valid, torch.ones(1, 3))
    flat = noisy[0, 0, 8:, 8:]  # the only flat, unclipped quadrant: every chosen window lies in it
    for p in patches[0, :, 0]:
        assert abs(float(p.mean())) < 1e-6
        hits = [(r, c) for r in range(8, SIZE - 3) for c in range(8, SIZE - 3)
                if torch.allclose(noisy[0, 0, r:r + 4, c:c + 4] - noisy[0, 0, r:r + 4, c:c + 4].mean(), p, atol=1e-6)]
        assert hits, "a window outside the flat quadrant was chosen"
    assert float(flat.std()) > 0.01  # the noise is there to be learnt
    _, valid = flat_noise_patches(torch.full((1, 1, SIZE, SIZE), -1.0), patch=4, count=2)
    assert torch.equal(valid, torch.zeros(1, 2))  # all clipped: no usable window, weight 0
    with pytest.raises(ValueError, match="patches-per-record"):
        flat_noise_patches(noisy, patch=8, count=10)


# -- the noise GAN speaks grain -------------------------------------------------------
def lag1(x: torch.Tensor, diagonal: bool = False) -> float:
    x = x.detach()
    y = x[..., 1:, 1:] if diagonal else x[..., :, 1:]
    return float((y * (x[..., :-1, :-1] if diagonal else x[..., :, :-1])).mean() / x.pow(2).mean())


def grainy(n=N, seed=0, std=0.02) -> torch.Tensor:
    """Flat images (0.3) plus correlated noise (white through a Gaussian of 1 px): lag-1 ~0.6."""
    z = torch.randn(n, 1, SIZE + 6, SIZE + 6, generator=torch.Generator().manual_seed(seed))
    noise = F.conv2d(z, gaussian_kernel(1.0))
    return 0.3 + std * noise / noise.std()


def test_generator_colours_white_noise_per_site_with_its_std_held_apart():
    r = recipe(**{"gen-kernel": 3, "noise-scale": 0.02, "denoiser-scale": 0.05})
    model = r.build()
    assert model.gen.scale == 0.02 and model.denoiser.scale == 0.05  # two units, two options
    with torch.no_grad():
        model.gen.kernel.weight[1] = torch.tensor([0.0, 0, 0, 0, 1, 1, 0, 0, 0]) * 3.0  # site 1: 2-tap blur
        model.gen.log_gain.weight[1] = 0.5
    g = torch.Generator().manual_seed(0)
    white = model.gen.field(64, SIZE, torch.zeros(64, dtype=torch.long), g, torch.device("cpu"))
    grain = model.gen.field(64, SIZE, torch.ones(64, dtype=torch.long), g, torch.device("cpu"))
    assert abs(lag1(white)) < 0.05 and abs(lag1(grain) - 0.5) < 0.05  # the kernel is the grain, per site
    assert float(white.std()) == pytest.approx(0.02, rel=0.05)
    assert float(grain.std()) == pytest.approx(0.02 * torch.e ** 0.5, rel=0.05)  # the gain alone sets the std
    feats = second_order_features(grainy(n=64)[..., :4, :4] - 0.3, 0.02)
    assert float(feats[:, 1].mean()) > 0.2 > float(second_order_features(white[..., :4, :4], 0.02)[:, 1].mean())


def test_the_gan_learns_the_real_noise_grain_under_dp():
    """Real records hold correlated noise (lag-1 0.77, diagonal 0.61); G starts white. 40 DP
    steps of the GAN (D on second-order features, sigma 0.5) must bring G's correlation to the
    real one, the diagonal too (0.63 measured; with D blind to the lags, ``LAGS = ()``, its
    windowed rms alone still taught lag-1 0.60 but the diagonal only 0.42)."""
    r = recipe(**{"denoiser-steps": 0, "disc-width": 0, "patch": 4, "patches-per-record": 4})
    model, x = r.build(), grainy(n=12)
    before = lag1(model.gen.field(32, SIZE, torch.ones(32, dtype=torch.long), torch.Generator().manual_seed(1), "cpu"))
    private = PrivateTraining(plan(sigma=0.5, q=0.5), [], seed=0)
    train(r, model, x, private, steps=40)
    field = model.gen.field(32, SIZE, torch.ones(32, dtype=torch.long), torch.Generator().manual_seed(1), "cpu")
    real = x - 0.3
    assert abs(before) < 0.05 and lag1(field) > 0.5, (before, lag1(field))
    assert abs(lag1(field, diagonal=True) - lag1(real, diagonal=True)) < 0.1, (lag1(field, True), lag1(real, True))


# -- the DP argument -----------------------------------------------------------------
def test_one_gradient_per_patient_matches_the_oracle_and_depends_on_that_patient_alone():
    r = recipe()
    model, o = r.build(), r.options

    def grads_of(x):
        noise, valid = flat_noise_patches(x, o.patch, o.patches_per_record, o.flat_blur_px)
        fast = per_record_grads(model.disc, partial(record_disc_losses, kind=o.loss), noise, valid)
        ref = per_sample_grads_reference(model.disc, lambda m, n1, v1: record_disc_losses(m, n1, v1, o.loss)[0],
                                         noise, valid)
        return [fast[name] for name, _ in model.disc.named_parameters()], ref

    x = images()
    fast, ref = grads_of(x)
    assert all(g.shape[0] == N for g in fast)  # one per PATIENT, never one per window
    for f, g in zip(fast, ref):
        assert torch.allclose(f, g, atol=1e-6, rtol=1e-4)
    changed = x.clone()
    changed[3] = images(seed=9, n=1)[0]  # another patient in record 3's place
    fast2, _ = grads_of(changed)
    for g1, g2 in zip(fast, fast2):
        assert torch.allclose(torch.cat([g1[:3], g1[4:]]), torch.cat([g2[:3], g2[4:]]), atol=1e-7)
    assert any(not torch.allclose(g1[3], g2[3]) for g1, g2 in zip(fast, fast2))


def test_only_the_discriminator_is_private_and_it_never_travels():
    r = build_recipe(RunConfig(recipe="blind-denoise", image_size=SIZE, options=TINY))
    model = r.build()
    assert r.private_modules == ("disc",) and r.requires_labels is False
    shared = r.shared_keys(model)
    assert shared and not any(k.startswith("disc.") for k in shared)
    assert set(r.local_only_state(model)) == {f"disc.{k}" for k in model.disc.state_dict()}


def test_generator_and_denoiser_updates_do_not_depend_on_the_private_data():
    """With synth-noise = gaussian the denoiser's round reads no G output: its weights must be
    identical for two different datasets, while D (the private network) moves. G's step is
    guarded: un-noised private state left on D refuses it."""
    r = recipe(**{"synth-noise": "gaussian", "gaussian-std": "0.01,0.02,0.03"})
    outs = []
    for x in (images(seed=0), images(seed=5)):
        model = r.build()
        private = PrivateTraining(plan(sigma=0.5), [], seed=0)
        metrics = train(r, model, x, private, steps=2)
        assert private.history == [(0.5, 0.5, 2)] and metrics["denoiser_steps"] == 2
        assert not any(k.startswith("loss_disc") for k in metrics)  # nothing read from real records
        outs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0] if k.startswith("denoiser."))
    assert any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0] if k.startswith("disc."))
    model = r.build()
    next(model.disc.parameters()).grad_sample = torch.zeros(1)
    with pytest.raises(AssertionError, match="un-noised"):
        r.gen_step(model, torch.optim.Adam(model.gen.parameters()), 0, torch.Generator())


def test_restore_is_deterministic_in_range_and_options_are_checked():
    r = recipe()
    model = r.build()
    x = images()
    a, b = r.restore(model, x, 2), r.restore(model, x, 2)
    assert torch.equal(a, b) and a.shape == x.shape and a.abs().max() <= 1
    assert r.degradation().task == "denoise"
    assert r.sample(model, torch.zeros(2, SIZE, SIZE, dtype=torch.long), 1).shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ConfigError, match="gaussian-std"):
        recipe(**{"gaussian-std": "0.1,0.2"})  # 3 sites
    with pytest.raises(ConfigError, match="patch"):
        recipe(patch=32)


# -- label-free at the node (accounting = Opacus'), and through Flower ----------------
@pytest.fixture
def unlabelled_federation(tiny_federation, tmp_path):
    """The tiny federation with site B's labels/ folder removed (an unlabelled hospital)."""
    root = tmp_path / "unlabelled"
    shutil.copytree(tiny_federation, root)
    shutil.rmtree(root / "sites" / "B" / "labels")
    return root


def _node_round(config: RunConfig, server_round: int, arrays=None):
    r = build_recipe(config)
    content = RecordDict({"arrays": arrays or ArrayRecord(r.shared_state(r.build())),
                          "config": ConfigRecord({"run-key": "run-1", "absolute-round": server_round,
                                                  "server-round": server_round})})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=config.to_run_config())
    return app(Message(content, dst_node_id=7, message_type="train"), context)


def test_an_unlabelled_site_trains_it_with_opacus_accounting_and_a_map_recipe_is_refused_first(
        unlabelled_federation, tmp_path, flower_task_identity):
    base = RunConfig(num_rounds=2, local_steps=2, batch_size=2, image_size=32, sites="A,B", accountant="rdp",
                     data_root=str(unlabelled_federation), eval_every=0, target_epsilon=5.0)
    refused = base.replace(recipe="cddpm", state_root=str(tmp_path / "refused"),
                           options={"channels": "8,16", "norm-groups": 4})
    reply = _node_round(refused, 1)
    assert reply.has_error() and reply.error.code == SITE_DATA_REFUSED and "cddpm" in reply.error.reason
    assert not (tmp_path / "refused" / "B" / "privacy_ledger.json").exists()
    with pytest.raises(SiteDataRefused):
        build_recipe(refused).check_site(types.SimpleNamespace(has_labels=False))
    config = base.replace(recipe="blind-denoise", state_root=str(tmp_path / "state"), options=TINY)
    first = _node_round(config, 1)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    second = _node_round(config, 2, first.content["arrays"])
    assert not second.has_error(), second.error.reason if second.has_error() else ""
    assert set(second.content["arrays"].keys()) == set(build_recipe(config).shared_keys(build_recipe(config).build()))
    ledger = json.loads((tmp_path / "state" / "B" / "privacy_ledger.json").read_text())
    sigma, q = ledger["plan"]["noise_multiplier"], ledger["plan"]["sample_rate"]
    assert ledger["history"] == [[sigma, q, 4]]  # both rounds in ONE history (2 + 2 steps)
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, 4)]
    expected = accountant.get_epsilon(delta=ledger["plan"]["delta"])
    assert second.content["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert first.content["metrics"]["epsilon"] < expected <= 5.0


@pytest.mark.slow
def test_two_flower_rounds_on_a_federation_with_an_unlabelled_site(unlabelled_federation, tmp_path, simulate):
    trains = simulate(unlabelled_federation, tmp_path / "run",
                      ["recipe=blind-denoise", "num-rounds=2", "local-steps=2", "image-size=32", "batch-size=4",
                       "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "options.denoiser-steps=2",
                       "options.denoiser-width=8", "options.gen-kernel=3", "options.disc-width=8"], timeout=600)
    assert [t["round"] for t in trains] == [1, 2]
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
