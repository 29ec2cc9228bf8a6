"""restore-diffusion: the forward models are seeded and their ground truth exact; the DP
argument (one clipped gradient per record, from that record alone; the noise lands; every
parameter is private); restoration is seeded and keeps measured pixels; an unlabelled site
trains it while a map-conditioned recipe is refused before its ledger; 2 Flower rounds."""

from __future__ import annotations

import math
import shutil
import types

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from medgen.client.app import SITE_DATA_REFUSED, app
from medgen.config import ConfigError, RunConfig
from medgen.models.capabilities import SiteDataRefused
from medgen.models.cddpm import record_losses
from medgen.models.degradations import (Degradation, NoiseModel, add_noise, area_downsample,
                                        hole_masks, noise_model_for)
from medgen.models.recipe import RoundContext
from medgen.models.registry import build_recipe
from medgen.models.restore_diffusion import RestoreDiffusion
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

torch.set_num_threads(1)
SIZE, N = 16, 6
RICIAN = NoiseModel("rician", 0.06)
TINY = {"channels": "8,16", "norm-groups": 4, "sample-steps": 3}


def recipe(**options) -> RestoreDiffusion:
    return RestoreDiffusion(RunConfig(recipe="restore-diffusion", image_size=SIZE, batch_size=4,
                                      sites="A,B,C", options={**TINY, **options}))


def images(seed=0, n=N) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def plan(sigma=1.0, q=1.0):
    return PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=q,
                       total_steps=1000, noise_multiplier=sigma, max_grad_norm=1.0, releases=())


def dataset(x: torch.Tensor) -> TensorDataset:
    return TensorDataset(x, torch.zeros(len(x), SIZE, SIZE, dtype=torch.long))  # placeholder labels


def train(r, model, x, private, steps=2, seed=0, state=None):
    ctx = RoundContext(dataset(x), None, private, 1, steps, {} if state is None else state, "cpu", seed)
    return r.train_local(model, ctx)


# -- forward models ------------------------------------------------------------------
@pytest.mark.parametrize("task", ["denoise", "sr2", "sr4", "inpaint"])
def test_degradations_are_deterministic_given_the_generator(task):
    d = Degradation(task, RICIAN)
    a, b = (d.apply(images(), torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.condition, b.condition) and torch.equal(a.measurement, b.measurement)
    if task in ("denoise", "inpaint"):  # random draws: another seed, another measurement
        assert not torch.equal(a.condition, d.apply(images(), torch.Generator().manual_seed(4)).condition)


def test_area_downsampling_is_the_exact_block_mean():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(area_downsample(x, 2)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(area_downsample(x, 4)[0, 0], torch.tensor([[7.5]]))
    sr2 = Degradation("sr2", RICIAN).apply(images(), torch.Generator())
    assert sr2.measurement.shape == (N, 1, SIZE // 2, SIZE // 2) and sr2.condition.shape == (N, 1, SIZE, SIZE)
    flat = torch.full((1, 1, SIZE, SIZE), 0.3)  # bicubic of a constant is the constant
    assert torch.allclose(Degradation("sr4", RICIAN).apply(flat, torch.Generator()).condition, flat)


def test_inpaint_mask_is_one_square_hole_inside_the_central_half_and_the_rest_is_exact():
    x = images()
    d = Degradation("inpaint", RICIAN, hole_fraction=0.25).apply(x, torch.Generator().manual_seed(1))
    side = round(0.25 * SIZE)
    for known, measured, clean in zip(d.known[:, 0], d.measurement[:, 0], x[:, 0]):
        rows, cols = torch.nonzero(known == 0, as_tuple=True)
        assert len(rows) == side * side and rows.max() - rows.min() == side - 1
        assert rows.min() >= SIZE // 4 and rows.max() < 3 * SIZE // 4 and cols.min() >= SIZE // 4
        assert torch.equal(measured[known == 1], clean[known == 1]) and (measured[known == 0] == 0).all()
    assert torch.equal(d.condition[:, 1:], d.known)
    assert torch.equal(hole_masks(3, SIZE, 0.25, torch.Generator().manual_seed(9)),
                       hole_masks(3, SIZE, 0.25, torch.Generator().manual_seed(9)))


def test_rician_noise_on_zero_signal_is_rayleigh_and_ct_noise_has_its_hu_std_and_grain():
    sigma = 0.05  # zero signal on [0, 1]: the magnitude is Rayleigh, mean sigma sqrt(pi / 2)
    zero = torch.full((8, 1, 64, 64), -1.0)
    out01 = (add_noise(zero, NoiseModel("rician", sigma), torch.Generator().manual_seed(0)) + 1) / 2
    assert abs(float(out01.mean()) - sigma * math.sqrt(math.pi / 2)) < 0.02 * sigma * 10
    window = types.SimpleNamespace(normalisation="window", window=(-1000.0, 2000.0))
    ct = noise_model_for(window, mr_sigma=0.06, ct_noise_hu=60.0, ct_grain_px=1.0)
    assert ct.kind == "correlated" and ct.sigma == pytest.approx(2 * 60.0 / 3000.0)
    grey = torch.zeros(8, 1, 64, 64)
    noise_hu = (add_noise(grey, ct, torch.Generator().manual_seed(0)) - grey) * 1500.0
    assert float(noise_hu.std()) == pytest.approx(60.0, rel=0.05)  # exact std, in HU
    lag1 = float((noise_hu[..., 1:] * noise_hu[..., :-1]).mean() / noise_hu.var())
    assert lag1 > 0.5  # correlated grain (white noise would give ~0)
    assert noise_model_for(None, 0.06, 60.0, 1.0) == NoiseModel("rician", 0.06)  # MR / unknown units


# -- the DP argument -----------------------------------------------------------------
@pytest.mark.parametrize("task,mode,draws", [("denoise", "vmap", 1), ("sr2", "vmap", 3),
                                             ("inpaint", "hooks", 1)])
def test_one_gradient_per_record_matches_the_oracle_and_depends_on_that_record_alone(task, mode, draws):
    r = recipe(**{"task": task, "grad-sample-mode": mode, "noise-draws": draws})
    model = r.build()
    with torch.no_grad():  # MONAI zero-initialises the output conv: give every layer a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    degradation = r.degradation()

    def grads_of(x):
        private = PrivateTraining(plan(), [], seed=0)
        wrapped, _, _ = private.make_private(model.denoiser, torch.optim.SGD(model.denoiser.parameters(), lr=0.1),
                                             dataset(x), len(x), grad_sample_mode="no_op" if mode == "vmap" else "hooks")
        r.private_backward(model.denoiser, wrapped, x, degradation, 1, torch.Generator().manual_seed(7),
                           torch.Generator().manual_seed(8))
        fast = [p.grad_sample.clone() for p in model.denoiser.parameters()]
        pairs = r.training_pairs(x, degradation, torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
        condition, x_t, t, target = pairs
        ref = per_sample_grads_reference(wrapped, lambda m, *rec: record_losses(m, *rec)[0],
                                         x_t, condition, torch.full((len(x),), 1), t, target)
        private.close()
        if hasattr(wrapped, "to_standard_module"):
            wrapped.to_standard_module()
        for p in model.denoiser.parameters():
            p.grad_sample = None
        return fast, ref

    x = images()
    fast, ref = grads_of(x)
    assert all(g.shape[0] == N for g in fast)  # one per RECORD (never per draw)
    # over all parameters at once: the attention key bias has an exactly-zero gradient (softmax
    # shift invariance) that both paths compute as ~1e-10 rounding noise, relatively all noise
    flat = lambda gs: torch.cat([g.flatten(1) for g in gs], dim=1)  # noqa: E731
    assert float((flat(fast) - flat(ref)).norm(dim=1).max() / flat(ref).norm(dim=1).min()) < 1e-4
    changed = x.clone()
    changed[3] = -changed[3]  # another patient in record 3's place
    fast2, _ = grads_of(changed)
    for g1, g2 in zip(fast, fast2):  # only record 3's gradient moved
        assert torch.allclose(torch.cat([g1[:3], g1[4:]]), torch.cat([g2[:3], g2[4:]]), atol=1e-6)
    assert any(not torch.allclose(g1[3], g2[3]) for g1, g2 in zip(fast, fast2))


def test_every_parameter_is_private_and_travels_and_no_labels_are_needed():
    r = build_recipe(RunConfig(recipe="restore-diffusion", image_size=SIZE, options=TINY))
    model = r.build()
    assert r.private_modules == ("denoiser",) and r.requires_labels is False
    private = {id(p) for p in model.denoiser.parameters()}
    assert all(id(p) in private for p in model.parameters())  # nothing trains outside DP-SGD
    assert r.shared_keys(model) == list(model.state_dict())
    assert r.site_indexed_keys == ("denoiser.class_embedding.weight",)


def test_train_local_takes_exactly_the_steps_returns_no_private_losses_and_the_noise_lands():
    r = recipe()
    x = images(n=4)  # = the batch size: Poisson sampling at q = 1 takes every record every step
    runs = {}
    for sigma, seed in [(1.0, 0), (1.0, 1), (0.0, 0), (0.0, 1)]:
        model, state = r.build(), {}
        private = PrivateTraining(plan(sigma=sigma, q=1.0), [], seed=seed)
        metrics = train(r, model, x, private, steps=3, seed=5, state=state)
        assert private.steps_taken == 3 and private.history == [(sigma, 1.0, 3)]
        assert metrics["denoiser_steps"] == 3 and not any("loss" in k for k in metrics)
        assert state["rounds_trained"] == 1 and "opt_denoiser" in state
        assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
        runs[(sigma, seed)] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # the privacy round's seed changes only the DP noise here: it moves the weights iff sigma > 0
    assert not torch.allclose(runs[(1.0, 0)], runs[(1.0, 1)])
    assert torch.equal(runs[(0.0, 0)], runs[(0.0, 1)])


def test_restoration_is_seeded_keeps_measured_pixels_and_starts_at_the_classical_answer():
    r = recipe(task="inpaint")
    model = r.build()  # untrained: MONAI's zero output conv makes the residual 0 -> the base
    d = r.degradation().apply(images(), torch.Generator().manual_seed(2))
    out = r.restore(model, d.condition, 0, torch.Generator().manual_seed(5))
    assert torch.equal(out, d.measurement.clamp(-1, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    a = r.restore(model, d.condition, 0, torch.Generator().manual_seed(5))
    b = r.restore(model, d.condition, 0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a[d.known.bool()], d.measurement[d.known.bool()])  # measured pixels kept
    assert not torch.equal(a, d.measurement)  # the hole is painted
    assert r.sample(model, torch.zeros(2, SIZE, SIZE, dtype=torch.long), 1).shape == (2, 1, SIZE, SIZE)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="task"):
        recipe(task="deblur")
    with pytest.raises(ConfigError, match="noise-draws"):
        recipe(**{"grad-sample-mode": "hooks", "noise-draws": 2})


# -- label-free at the node, and through Flower --------------------------------------
@pytest.fixture
def unlabelled_federation(tiny_federation, tmp_path):
    """The tiny federation with site B's labels/ folder removed (an unlabelled hospital)."""
    root = tmp_path / "unlabelled"
    shutil.copytree(tiny_federation, root)
    shutil.rmtree(root / "sites" / "B" / "labels")
    return root


def _node_round(config: RunConfig, server_round: int):
    r = build_recipe(config)
    content = RecordDict({"arrays": ArrayRecord(r.shared_state(r.build())),
                          "config": ConfigRecord({"run-key": "run-1", "absolute-round": server_round,
                                                  "server-round": server_round})})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=config.to_run_config())
    return app(Message(content, dst_node_id=7, message_type="train"), context)


def test_an_unlabelled_site_trains_it_and_a_map_recipe_is_refused_before_its_ledger(
        unlabelled_federation, tmp_path, flower_task_identity):
    base = RunConfig(num_rounds=1, local_steps=2, batch_size=2, image_size=32, sites="A,B", accountant="rdp",
                     data_root=str(unlabelled_federation), eval_every=0, target_epsilon=5.0)
    refused = base.replace(recipe="cddpm", state_root=str(tmp_path / "refused"),
                           options={"channels": "8,16", "norm-groups": 4})
    reply = _node_round(refused, 1)
    assert reply.has_error() and reply.error.code == SITE_DATA_REFUSED and "cddpm" in reply.error.reason
    node = tmp_path / "refused" / "B"  # (its data cache and message log may exist)
    assert not (node / "privacy_ledger.json").exists() and not (node / "local_state.pt").exists()
    with pytest.raises(SiteDataRefused):
        build_recipe(refused).check_site(types.SimpleNamespace(has_labels=False))
    config = base.replace(recipe="restore-diffusion", state_root=str(tmp_path / "state"), options=TINY)
    reply = _node_round(config, 1)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert metrics["steps"] == 2 and 0 < metrics["epsilon"] <= 5.0
    assert (tmp_path / "state" / "B" / "privacy_ledger.json").is_file()


@pytest.mark.slow
def test_two_flower_rounds_on_a_federation_with_an_unlabelled_site(unlabelled_federation, tmp_path, simulate):
    trains = simulate(unlabelled_federation, tmp_path / "run",
                      ["recipe=restore-diffusion", "options.task=sr2", "num-rounds=2", "local-steps=2",
                       "image-size=32", "batch-size=4", "accountant=rdp", "target-epsilon=8.0", "eval-every=0",
                       "options.channels=8,16", "options.norm-groups=4", "options.sample-steps=2"], timeout=600)
    assert [t["round"] for t in trains] == [1, 2]
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
