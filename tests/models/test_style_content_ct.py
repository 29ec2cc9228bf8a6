"""style-content-ct: the privacy argument (only D private, G's update independent of the
site's data, ledger = Opacus), content/style transfer, and 2 rounds through Flower on the
head-CT federation.

Mutations each test was run against (and failed, as it should):
- D not given to DP-SGD (the spy sees another module) -> test_only_the_critic_...;
- the content loss dropped from the G step's loss -> test_content_loss_reaches_the_generator;
- the style code ignored by the decoder (AdaIN gain/shift zeroed) -> test_transfer_...
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.config import RunConfig
from medgen.models.dp_cgan import disc_loss
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.models.style_content_ct import StyleContentCT, content_loss
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule
from medgen.privacy.ledger import PrivacyPlan
from medgen.privacy.round import PrivacyRound, PrivacySchedule
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

SIZE, N, BATCH = 16, 12, 4


def setup(**options):
    config = RunConfig(recipe="style-content-ct", image_size=SIZE, batch_size=BATCH, sites="A,B", seed=0,
                       label_names="background,csf,gm,wm",
                       options={"gen-width": 4, "disc-width": 4, "style-dim": 4, **options})
    recipe = build_recipe(config)
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(N, BATCH),
                       total_steps=100, noise_multiplier=1.0, max_grad_norm=1.0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    r = (xx ** 2 + yy ** 2).sqrt()
    maps = torch.stack([((r < 0.9).long() + (r < 0.6).long() + (r < 0.3 + 0.05 * k).long()) for k in range(4)])
    return recipe, PublicData(maps), plan


def site_data(level: float, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = (level + 0.3 * torch.randn(N, 1, SIZE, SIZE, generator=gen)).clamp(-1, 1)
    return TensorDataset(images, torch.zeros(N, SIZE, SIZE, dtype=torch.long))


def train(recipe, model, data, public, private, steps=2, state=None, seed=0):
    ctx = RoundContext(data, public, private, 0, steps, {} if state is None else state, "cpu", seed)
    return recipe.train_local(model, ctx)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_declarations_and_what_travels():
    recipe, _, _ = setup()
    assert isinstance(recipe, StyleContentCT) and recipe.private_modules == ("disc",)
    assert not recipe.requires_labels and recipe.one_off_releases() == ()
    model = recipe.build()
    assert set(recipe.shared_keys(model)) == {k for k in model.state_dict() if k.startswith("gen.")}
    assert "gen.site_style.weight" in recipe.site_indexed_keys


def test_only_the_critic_is_private_and_real_images_reach_only_it(monkeypatch):
    recipe, public, plan = setup()
    wrapped = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        wrapped.append((module, dataset))
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model = recipe.build()
    data = site_data(0.3, 0)
    train(recipe, model, data, public, PrivateTraining(plan, [], seed=0))
    assert [(m, d) for m, d in wrapped] == [(model.disc, data)]
    model.zero_grad(set_to_none=True)
    disc_loss(model.disc(data.tensors[0][:4], torch.zeros(4, dtype=torch.long)), True, "nonsat").mean().backward()
    touched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert touched and all(n.startswith("disc.") for n in touched)


def g_step(recipe, model, public, plan, data):
    """One G step inside a DP round on ``data`` (D in scope, released), seeded."""
    recipe._round_public = public
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.disc.parameters(), lr=1e-3)
    with DPModule(PrivateTraining(plan, [], seed=3), model.disc, opt_d, data, BATCH) as d:
        recipe.gen_step(model, d, opt_g, 0, torch.Generator().manual_seed(1), "cpu")
    return model.gen.state_dict()


def test_generator_update_does_not_depend_on_private_data():
    """From the same released D, the G step (inside the DP round, data set in scope) leaves
    G bit-identical for two different sites' data sets: it reads public content only."""
    recipe, public, plan = setup()
    start = recipe.build()
    gens = [g_step(recipe, copy.deepcopy(start), public, plan, site_data(level, seed))
            for level, seed in ((0.6, 0), (-0.6, 9))]
    initial = start.gen.state_dict()
    assert any(not torch.equal(gens[0][k], initial[k]) for k in initial), "the G step did not train G"
    assert all(torch.equal(gens[0][k], gens[1][k]) for k in initial)


def test_content_loss_reaches_the_generator():
    """content-weight 0 and 1 give different G steps; an image keeps its own content."""
    gens = []
    for weight in (0.0, 1.0):
        recipe, public, plan = setup(**{"content-weight": weight})
        gens.append(g_step(recipe, recipe.build(), public, plan, site_data(0.3, 0)))
    assert not all(torch.equal(gens[0][k], gens[1][k]) for k in gens[0])
    content = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert float(content_loss(content, content).max()) < 1e-5


def test_transfer_keeps_content_shape_and_follows_the_style_image():
    recipe, public, _ = setup()
    model = recipe.build()
    with torch.no_grad():  # a style encoder whose codes differ visibly between the two styles
        model.gen.style_encoder[-1].bias.zero_()
        model.gen.style_encoder[-1].weight.normal_(0, 3.0)
    content = site_data(0.0, 1).tensors[0][:3]
    dark, bright = torch.full((1, 1, SIZE, SIZE), -0.9), site_data(0.8, 2).tensors[0][:1]
    a, b = recipe.transfer(model, content, dark), recipe.transfer(model, content, bright)
    assert a.shape == (3, 1, SIZE, SIZE) and a.abs().max() <= 1 and not torch.allclose(a, b, atol=1e-4)
    samples = recipe.sample(model, public.label_maps[:2], 1, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, SIZE, SIZE) and torch.isfinite(samples).all()


def test_ledger_epsilon_equals_the_opacus_accountant(tmp_path):
    recipe, public, _ = setup()
    q = sample_rate_for(N, BATCH)
    schedule = PrivacySchedule(target_epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=q,
                               total_steps=4, max_grad_norm=1.0, releases=recipe.one_off_releases())
    model, data, state = recipe.build(), site_data(0.3, 0), {}
    for server_round in (1, 2):
        privacy = PrivacyRound.at(tmp_path / "ledger.json", "A", schedule, run_id="r", server_round=server_round,
                                  steps=2, cap_epsilon=8.0, seed=server_round)
        with privacy as private:
            train(recipe, model, data, public, private, state=state, seed=server_round)
    oracle = RDPAccountant()
    for _ in range(4):
        oracle.step(noise_multiplier=privacy.plan.noise_multiplier, sample_rate=q)
    assert privacy.ledger.steps == 4
    assert privacy.epsilon == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy.epsilon <= 8.0 + 1e-6


@pytest.mark.slow
def test_two_rounds_through_flower_on_the_head_ct_federation(tmp_path, simulate):
    root = build_head_federation(HeadSimConfig(seed=0, sites="A,B", subjects_per_site=4, public_size=4,
                                               heldout_fit=0, heldout_test=2, image_size=32),
                                 tmp_path / "data").root
    train_records = simulate(root, tmp_path / "run", [
        "recipe=style-content-ct", "num-rounds=2", "local-steps=2", "batch-size=2", "image-size=32",
        "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "options.gen-width=4", "options.disc-width=4",
        "options.style-dim=4"], timeout=600)
    assert [r["round"] for r in train_records] == [1, 2]
    for record in train_records:
        assert set(record["per_site"]) == {"A", "B"} and record["excluded"] == []
    assert 0 < train_records[0]["aggregate"]["epsilon"] < train_records[1]["aggregate"]["epsilon"] <= 8.0 + 1e-6
