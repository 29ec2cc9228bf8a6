"""volume-gan: per-patient DP through both critics, the post-processing property of G,
the 2D-only option, sampling, and 2 rounds through Flower on a 3D federation.

Synthetic volumes for the unit tests: a bright ellipsoid whose radius shrinks towards
the ends of the stack (16 px, 8 slices), a site = its intensity level + noise.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from medgen.config import RunConfig
from medgen.models.registry import build_recipe
from medgen.models.recipe import RoundContext
from medgen.models.volume_gan import VolumeConsistentGAN, record_loss
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan
from medgen.server.checkpoint import load_checkpoint
from medgen.server.cli import main
from medgen.server.run_log import read_metrics
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

SIZE, DEPTH = 16, 8


def volumes(n: int, level: float, seed: int, depth: int = DEPTH) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, depth), torch.linspace(-1, 1, SIZE),
                             torch.linspace(-1, 1, SIZE), indexing="ij")
    out = []
    for _ in range(n):
        radius = 0.6 + 0.2 * torch.rand(1, generator=gen)
        inside = (x ** 2 + y ** 2 + (0.8 * z) ** 2) < radius ** 2
        image = torch.where(inside, torch.tensor(level), torch.tensor(-0.9))
        out.append(image + 0.05 * torch.randn(image.shape, generator=gen))
    return torch.stack(out).clamp(-1, 1).unsqueeze(1)


def setup(n=12, batch=4, level=0.5, seed=0, options=None):
    config = RunConfig(recipe="volume-gan", image_size=SIZE, batch_size=batch, sites="A,B", seed=0,
                       options={"depth": DEPTH, "gen-width": 8, "disc-width": 8, "code-dim": 16,
                                **(options or {})})
    recipe = build_recipe(config)
    data = TensorDataset(volumes(n, level, seed), torch.zeros(n, DEPTH, SIZE, SIZE, dtype=torch.long))
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp",
                       sample_rate=sample_rate_for(n, batch), total_steps=1000,
                       noise_multiplier=1.0, max_grad_norm=1.0)
    return recipe, data, plan


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_recipe_declares_volumes_no_labels_and_shares_only_the_generator():
    recipe, *_ = setup()
    assert isinstance(recipe, VolumeConsistentGAN)
    assert recipe.consumes == "volumes" and recipe.requires_labels is False
    model = recipe.build()
    assert set(recipe.shared_keys(model)) == {k for k in model.state_dict() if k.startswith("gen.")}
    assert recipe.private_modules == ("disc",) and model.disc.volume is not None
    baseline = build_recipe(recipe.config.replace(options={**recipe.config.options, "volume-disc": False}))
    base_model = baseline.build()
    assert base_model.disc.volume is None  # the 2D-only baseline: no 3D critic at all
    # ... and the SAME generator (composition, not a copy): identical initial weights
    gen, base_gen = model.gen.state_dict(), base_model.gen.state_dict()
    assert gen.keys() == base_gen.keys() and all(torch.equal(gen[k], base_gen[k]) for k in gen)


def test_per_patient_grads_through_both_critics_match_an_autograd_loop():
    """One record = one patient's VOLUME: Opacus' per-sample gradient over every critic
    parameter (slice and volume terms together) equals the per-patient autograd oracle."""
    recipe, data, plan = setup(n=3, batch=3)
    model = recipe.build()
    images = data.tensors[0]
    site = torch.tensor([0, 1, 0])
    o = recipe.options

    def one_patient_loss(module, image, s):
        return record_loss(module(image, s), True, o.loss, o.volume_weight)

    private = PrivateTraining(plan, [], seed=0)
    critics, dp_opt, _ = private.make_private(model.disc, torch.optim.SGD(model.disc.parameters(), lr=0.1),
                                              data, 3)
    expected = per_sample_grads_reference(critics, one_patient_loss, images, site)
    record_loss(critics(images, site), True, o.loss, o.volume_weight).backward()
    got = [p.grad_sample for p in dp_opt.params]
    assert len(got) == len(expected) == len(list(model.disc.parameters()))
    assert any(n.startswith("volume.") for n, _ in model.disc.named_parameters())
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.shape[0] == 3  # one row per PATIENT, not per slice
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (g - e).abs().max()
    private.close()


def _gen_after_one_d_and_g_step(data, recipe, plan, disc_state):
    """A D step on ``data`` (private records flow), then D reset to ``disc_state``, then one G step."""
    model = recipe.build()
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=1e-2)
    private = PrivateTraining(plan, [], seed=0)
    with DPModule(private, model.disc, torch.optim.Adam(model.disc.parameters()), data, 4) as d:
        recipe.disc_step(model, d, data.tensors[0][:4], 0, torch.Generator().manual_seed(5),
                         torch.device("cpu"))
        model.disc.load_state_dict(disc_state)  # "the same discriminators"
        recipe.gen_step(model, d, opt_g, 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    return model.gen.state_dict()


def test_generator_update_does_not_depend_on_private_data():
    recipe, data_a, plan = setup(level=0.5, seed=0)
    _, data_b, _ = setup(level=-0.2, seed=9)
    assert not torch.equal(data_a.tensors[0], data_b.tensors[0])
    disc_state = copy.deepcopy(recipe.build().disc.state_dict())
    gen_a = _gen_after_one_d_and_g_step(data_a, recipe, plan, disc_state)
    gen_b = _gen_after_one_d_and_g_step(data_b, recipe, plan, disc_state)
    initial = recipe.build().gen.state_dict()
    assert any(not torch.equal(gen_a[k], initial[k]) for k in gen_a), "the G step did not train G"
    for key in gen_a:
        assert torch.equal(gen_a[key], gen_b[key]), f"G parameter {key} depends on the private data"


def test_generator_step_refuses_unreleased_private_state_on_the_critics():
    recipe, data, plan = setup()
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    with DPModule(private, model.disc, torch.optim.Adam(model.disc.parameters()), data, 4) as d:
        o = recipe.options
        record_loss(d.module(data.tensors[0][:4], torch.zeros(4, dtype=torch.long)), True, o.loss,
                    o.volume_weight).backward()  # per-patient grads, not yet noised
        with pytest.raises(AssertionError, match="grad_sample"):
            recipe.gen_step(model, d, torch.optim.Adam(model.gen.parameters()), 0,
                            torch.Generator().manual_seed(0), torch.device("cpu"))


def test_train_local_takes_exactly_steps_and_returns_public_metrics_only():
    recipe, data, plan = setup(options={"disc-steps-per-gen-step": 2})
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    state: dict = {}
    metrics = recipe.train_local(model, RoundContext(data, None, private, 1, 3, state, "cpu", 0))
    assert private.steps_taken == 3 and metrics["disc_steps"] == 3 and metrics["gen_steps"] == 1
    assert set(metrics) == {"loss_gen", "disc_fake_score", "loss_disc_fake", "disc_steps",
                            "gen_steps", "seconds"}
    assert not hasattr(model.disc, "autograd_grad_sample_hooks") and state["rounds_trained"] == 1


def test_real_volumes_are_resampled_to_the_recipe_depth_and_slices_refused():
    recipe, *_ = setup()
    deep = volumes(2, 0.5, seed=1, depth=2 * DEPTH)
    assert recipe.real_volumes((deep,), torch.device("cpu")).shape == (2, 1, DEPTH, SIZE, SIZE)
    empty = recipe.real_volumes((torch.zeros(0, 1, 2 * DEPTH, SIZE, SIZE),), torch.device("cpu"))
    assert empty.shape == (0, 1, DEPTH, SIZE, SIZE)
    with pytest.raises(ValueError, match="dims=3"):
        recipe.real_volumes((torch.zeros(2, 1, SIZE, SIZE),), torch.device("cpu"))


def test_sampling_volumes_and_slices_per_site():
    recipe, *_ = setup()
    model = recipe.build()
    vols = recipe.sample_volumes(model, 3, torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert vols.shape == (3, 1, DEPTH, SIZE, SIZE) and vols.abs().max() <= 1
    again = recipe.sample_volumes(model, 3, torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert torch.equal(vols, again)
    slices = recipe.sample(model, torch.zeros(5, SIZE, SIZE, dtype=torch.long), 0,
                           torch.Generator().manual_seed(0))
    assert slices.shape == (5, 1, SIZE, SIZE)


@pytest.mark.slow
def test_two_rounds_through_flower_on_a_3d_federation(tmp_path, run_dir, capsys):
    """The head federation built as volumes (dims = 3 in its dataset.toml: 16^3 per
    patient): each node loads volumes, volume-gan trains on them with DP, the server
    aggregates G only. (The brain federation stores one 2D slice per subject: no volumes.)"""
    root = build_head_federation(HeadSimConfig(seed=0, sites="A,B", subjects_per_site=4, public_size=2,
                                               heldout_fit=0, heldout_test=2, image_size=16, dims=3),
                                 tmp_path / "data").root
    settings = ["recipe=volume-gan", "num-rounds=2", "local-steps=2", "batch-size=2", "image-size=16",
                "accountant=rdp", "eval-every=0", "simulate-actors=1", "options.gen-width=4", "options.disc-width=4",
                "options.code-dim=16"]
    code = main(["simulate", "--data-root", str(root), "--out", str(run_dir), "--timeout", "600",
                 *[a for s in settings for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().out
    assert load_checkpoint(run_dir).server_round == 2
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert set(record["per_site"]) == {"A", "B"} and record["excluded"] == []
        assert all(site["disc_steps"] == 2 for site in record["per_site"].values())
    assert train[0]["aggregate"]["epsilon"] < train[1]["aggregate"]["epsilon"] <= 10.0 + 1e-6
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["node_ledgers"]["A"]["steps"] == 4  # 2 rounds x 2 steps, no one-off release
