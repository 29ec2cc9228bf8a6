"""two-stage: the label-map GAN's privacy argument (E and D one joint private module, one
accountant step per step), M's and G's post-processing, pairs from noise alone, and two
Flower rounds. Tiny synthetic anatomy (ellipse maps, one intensity per class), 16 px."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.config import RunConfig
from medgen.models.blocks import one_hot_labels
from medgen.models.dp_cgan import disc_loss
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.models.two_stage import TwoStageGAN
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

TINY = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4, "map-width": 4,
        "map-disc-width": 4, "moment-release": False}


def label_maps(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.4).tolist()
        r = ((xx - cx) / 0.8) ** 2 + ((yy - cy) / 0.85) ** 2
        out[i][r < 1.0], out[i][r < 0.8], out[i][r < 0.45] = 1, 2, 3
    return out


def setup(seed=0, options=None, n=24, batch=8):
    config = RunConfig(recipe="two-stage", image_size=16, batch_size=batch, sites="A,B", seed=0,
                       options={**TINY, **(options or {})})
    recipe = build_recipe(config)
    labels = label_maps(n, 16, seed)
    gen = torch.Generator().manual_seed(seed)
    images = (torch.tensor([-0.9, 0.7, 0.1, -0.4])[labels] + 0.05 * torch.randn(labels.shape, generator=gen))
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(n, batch),
                       total_steps=1000, noise_multiplier=1.0, max_grad_norm=1.0, releases=recipe.one_off_releases())
    return recipe, TensorDataset(images.clamp(-1, 1).unsqueeze(1), labels), PublicData(label_maps(30, 16, 1000)), plan


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _gen_after_d_and_g_step(recipe, data, public, plan, critic_state):
    torch.manual_seed(0)
    model = recipe.build()
    net = recipe.private_net(model)
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=1e-2)
    with DPModule(PrivateTraining(plan, [], seed=0), net, torch.optim.Adam(net.parameters()), data, 8) as d:
        images, labels = data.tensors[0][:8], data.tensors[1][:8]
        recipe.disc_step(model, d, images, labels, public, 0, torch.Generator().manual_seed(5), torch.device("cpu"))
        net.load_state_dict(critic_state)
        recipe.gen_step(model, d, opt_g, public, 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    return model.gen.state_dict()


@pytest.mark.parametrize("maps", ["generated", "public"])
def test_stage_one_and_two_updates_do_not_depend_on_private_data(maps):
    """Point 3. Mutation: M's loss read on the private batch's maps (or E's per-sample state
    left un-noised, refused by ``frozen``) breaks the equality."""
    recipe, data_a, public, plan = setup(options={"stage2-maps": maps})
    _, data_b, _, _ = setup(seed=99)
    assert not torch.equal(data_a.tensors[1], data_b.tensors[1])
    state = copy.deepcopy(recipe.private_net(recipe.build()).state_dict())
    gen_a = _gen_after_d_and_g_step(recipe, data_a, public, plan, state)
    gen_b = _gen_after_d_and_g_step(recipe, data_b, public, plan, state)
    initial = recipe.build().gen.state_dict()
    assert any(not torch.equal(gen_a[k], initial[k]) for k in gen_a if k.startswith("maps."))
    for key in gen_a:
        assert torch.equal(gen_a[key], gen_b[key]), f"G parameter {key} depends on the private data"


def test_critics_train_jointly_and_are_accounted_once_per_step():
    """Point 1: E changes (it saw the real maps through the joint clip), the history is ONE
    mechanism of ``steps`` entries, epsilon = Opacus' RDP accountant's. Mutation: a second
    engine for E doubles the entries; E outside the private module stays unchanged."""
    recipe, data, public, plan = setup()
    assert isinstance(recipe, TwoStageGAN) and recipe.private_modules == ("disc", "map_disc")
    model = recipe.build()
    before = copy.deepcopy(model.map_disc.state_dict())
    private = PrivateTraining(plan, [], seed=0)
    recipe.train_local(model, RoundContext(data, public, private, 1, 3, {}, "cpu", 0))
    assert any(not torch.equal(v, model.map_disc.state_dict()[k]) for k, v in before.items())
    assert private.steps_taken == 3 and sum(h[2] for h in private.history) == 3
    opacus = RDPAccountant()
    opacus.history = [(plan.noise_multiplier, sample_rate_for(len(data), 8), 3)]
    assert private.epsilon(1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    assert set(recipe.shared_keys(model)) == {k for k in model.state_dict() if k.startswith("gen.")}


def test_per_patient_grads_of_d_and_the_map_critic_match_an_autograd_loop():
    """Point 1, the joint clip's input: Opacus' per-patient gradient over D's AND E's
    parameters (D's real term + E's real term on the patient's own map, exactly as
    ``disc_step`` computes them) equals an autograd loop over single patients. Mutations
    tried: E read on another patient's map (``labels.roll(1, 0)`` in ``extra_real_loss``)
    fails it; E outside the private module (no ``grad_sample`` on E) fails the count."""
    recipe, data, _, plan = setup(n=4, batch=4)
    model = recipe.build()
    net = recipe.private_net(model)
    images, labels = data.tensors
    kind = recipe.options.loss

    def real_term(module, d, x, y):
        site = torch.zeros(x.shape[0], dtype=torch.long)
        return (disc_loss(module(x, one_hot_labels(y, recipe.num_classes), site), real=True, kind=kind).mean()
                + recipe.extra_real_loss(d, x, y))

    with DPModule(PrivateTraining(plan, [], seed=0), net, torch.optim.SGD(net.parameters(), lr=0.1), data, 4) as d:
        real_term(d.module, d, images, labels).backward()
        got = [p.grad_sample for p in d.optimizer.params]
        expected = per_sample_grads_reference(d.module, lambda m, x, y: real_term(m, d, x, y), images, labels)
    names = [n for n, p in net.named_parameters()]
    assert len(got) == len(expected) == len(names) and any(n.startswith("map_disc.") for n in names)
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape and g.shape[0] == 4, name
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (name, (g - e).abs().max())
    e_rows = torch.cat([e.flatten(1) for n, e in zip(names, expected) if n.startswith("map_disc.")], dim=1)
    assert (e_rows.norm(dim=1) > 0).all()  # E's term reaches every patient's row


def test_pairs_come_from_noise_alone_and_are_valid_maps_and_images():
    recipe, *_ = setup()
    model = recipe.build()
    images, maps = recipe.sample_pairs(model, 5, 1, torch.Generator().manual_seed(0))
    again, maps_again = recipe.sample_pairs(model, 5, 1, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 16, 16) and maps.shape == (5, 16, 16)
    assert torch.equal(maps, maps_again) and torch.allclose(images, again)
    assert maps.min() >= 0 and maps.max() < 4 and images.abs().max() <= 1


@pytest.mark.slow
def test_two_flower_rounds(tiny_federation, tmp_path, simulate):
    trains = simulate(tiny_federation, tmp_path / "run",
                      ["recipe=two-stage", "num-rounds=2", "local-steps=1", "image-size=32", "batch-size=4",
                       "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "options.gen-width=4",
                       "options.disc-width=4", "options.map-width=4", "options.map-disc-width=4"], timeout=900)
    assert [t["round"] for t in trains] == [1, 2]
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
