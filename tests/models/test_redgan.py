"""red-gan: the passive segmenter's privacy argument (public S free; private S in ONE joint
DP module with D, accounted once per step), its effect on G, rare-class draws, and two
Flower rounds. Tiny synthetic anatomy (ellipse maps, one intensity per class), 16 px."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.config import ConfigError, RunConfig
from medgen.models.blocks import one_hot_labels
from medgen.models.dp_cgan import disc_loss
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.red_gan import RedGAN
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

NAMES = "background,csf,gm,wm,lesion"
INTENSITY = (-0.9, 0.7, 0.1, -0.4, 0.95)
TINY = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4, "seg-width": 4,
        "seg-pretrain-steps": 0, "moment-release": False}


def label_maps(n: int, size: int, seed: int, lesion_every: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        r = ((xx - cx) / 0.8) ** 2 + ((yy - cy) / 0.85) ** 2
        out[i][r < 1.0], out[i][r < 0.8], out[i][r < 0.45] = 1, 2, 3
        if i % lesion_every == 0:
            out[i][((xx - cx - 0.2) ** 2 + (yy - cy) ** 2) < 0.03] = 4
    return out


def setup(seed=0, options=None, n=24, batch=8, intensity=INTENSITY):
    config = RunConfig(recipe="red-gan", image_size=16, batch_size=batch, sites="A,B", seed=0,
                       label_names=NAMES, options={**TINY, **(options or {})})
    recipe = build_recipe(config)
    labels = label_maps(n, 16, seed)
    noise = 0.05 * torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    images = (torch.tensor(intensity)[labels] + noise).clamp(-1, 1).unsqueeze(1)
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(n, batch),
                       total_steps=1000, noise_multiplier=1.0, max_grad_norm=1.0, releases=recipe.one_off_releases())
    return recipe, TensorDataset(images, labels), PublicData(label_maps(30, 16, 1000, lesion_every=5)), plan


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_the_recipe_declares_its_private_modules_by_mode():
    public, *_ = setup()
    private, *_ = setup(options={"seg-train": "private"})
    assert isinstance(public, RedGAN) and public.private_modules == ("disc",)
    assert private.private_modules == ("disc", "seg")
    model = public.build()
    assert set(public.shared_keys(model)) == {k for k in model.state_dict() if k.startswith(("gen.", "seg."))}
    with pytest.raises(ConfigError, match="rare-class 'tumour'"):
        setup(options={"rare-class": "tumour"})


def _gen_after_d_and_g_step(recipe, data, public, plan, private_state):
    """A D step on ``data`` (private records flow), the private module reset to
    ``private_state``, then one G step: G's new weights."""
    torch.manual_seed(0)
    model = recipe.build()
    net = recipe.private_net(model)
    net.requires_grad_(True)
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=1e-2)
    with DPModule(PrivateTraining(plan, [], seed=0), net, torch.optim.Adam(net.parameters()), data, 8) as d:
        images, labels = data.tensors[0][:8], data.tensors[1][:8]
        recipe.disc_step(model, d, images, labels, public, 0, torch.Generator().manual_seed(5), torch.device("cpu"))
        net.load_state_dict(private_state)
        recipe.gen_step(model, d, opt_g, public, 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    return model.gen.state_dict()


@pytest.mark.parametrize("mode", ["public", "private"])
def test_generator_update_does_not_depend_on_private_data(mode):
    """Points 2-4. Mutation: S's G-term read on the private batch (or S left with un-noised
    per-sample state in the private mode, refused by ``frozen``) breaks the equality."""
    recipe, data_a, public, plan = setup(options={"seg-train": mode})
    _, data_b, _, _ = setup(seed=99, intensity=(0.5, -0.8, 0.9, 0.0, -0.3))
    assert not torch.equal(data_a.tensors[1], data_b.tensors[1])
    state = copy.deepcopy(recipe.private_net(recipe.build()).state_dict())
    gen_a = _gen_after_d_and_g_step(recipe, data_a, public, plan, state)
    gen_b = _gen_after_d_and_g_step(recipe, data_b, public, plan, state)
    initial = recipe.build().gen.state_dict()
    assert any(not torch.equal(gen_a[k], initial[k]) for k in gen_a)
    for key in gen_a:
        assert torch.equal(gen_a[key], gen_b[key]), f"G parameter {key} depends on the private data"


def test_the_passive_segmenter_moves_the_generator():
    """Mutation: ``extra_gen_loss`` not added to G's loss makes seg-weight 0 and 1 equal."""
    recipe, data, public, plan = setup()
    plain, *_ = setup(options={"seg-weight": 0.0})
    state = copy.deepcopy(recipe.private_net(recipe.build()).state_dict())
    with_s = _gen_after_d_and_g_step(recipe, data, public, plan, state)
    without = _gen_after_d_and_g_step(plain, data, public, plan, state)
    assert any(not torch.equal(with_s[k], without[k]) for k in with_s)


@pytest.mark.parametrize("mode", ["public", "private"])
def test_public_s_is_untouched_by_private_steps_and_private_s_is_accounted_once_per_step(mode):
    """Point 2: in the public mode, S after a round equals S before (no private gradient).
    Point 3: in the private mode S trains, and the history is ONE mechanism, ``steps``
    entries at the plan's sigma and q: the epsilon equals Opacus' RDP accountant's for it.
    Mutation: a second engine for S adds entries; S outside the clip leaves it unchanged."""
    recipe, data, public, plan = setup(options={"seg-train": mode})
    model = recipe.build()
    before = copy.deepcopy(model.seg.state_dict())
    private = PrivateTraining(plan, [], seed=0)
    steps = 3
    recipe.train_local(model, RoundContext(data, public, private, 0, steps, {}, "cpu", 0))
    changed = any(not torch.equal(v, model.seg.state_dict()[k]) for k, v in before.items())
    assert changed is (mode == "private")
    assert private.steps_taken == steps and sum(h[2] for h in private.history) == steps
    opacus = RDPAccountant()
    opacus.history = [(plan.noise_multiplier, sample_rate_for(len(data), 8), steps)]
    assert private.epsilon(1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.seg.parameters())


def test_rare_class_draws_hold_the_class_at_least_at_the_set_fraction():
    """Mutation: ignoring rare-fraction leaves the bank's own rate (1 in 5 maps)."""
    recipe, _, public, _ = setup(options={"rare-class": "lesion", "rare-fraction": 0.8})
    one_hot, _ = recipe._public_conditions(public, 0, 400, torch.Generator().manual_seed(0), "cpu")
    holds = (one_hot[:, 4].flatten(1).sum(dim=1) > 0).float().mean()
    assert holds > 0.75  # 0.8 + 0.2 x 0.2 expected
    base = (public.label_maps == 4).flatten(1).any(dim=1).float().mean()
    assert base < 0.3


def test_per_patient_grads_of_d_and_private_s_match_an_autograd_loop():
    """Point 3, the joint clip's input: Opacus' per-patient gradient over D's AND S's
    parameters (D's real term + S's Dice-CE, exactly as ``disc_step`` computes them) equals
    an autograd loop over single patients. Mutations tried: S's Dice pooled over the batch
    (``DiceCELoss(batch=True)``: a patient's row then depends on the others) fails it; S
    read outside the private module (no ``grad_sample`` on S) fails the count."""
    recipe, data, _, plan = setup(options={"seg-train": "private"}, n=4, batch=4)
    model = recipe.build()
    net = recipe.private_net(model)
    net.requires_grad_(True)
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
    assert len(got) == len(expected) == len(names) and any(n.startswith("seg.") for n in names)
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape and g.shape[0] == 4, name
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (name, (g - e).abs().max())
    seg_rows = torch.cat([e.flatten(1) for n, e in zip(names, expected) if n.startswith("seg.")], dim=1)
    assert (seg_rows.norm(dim=1) > 0).all()  # S's term reaches every patient's row


@pytest.mark.slow
def test_two_flower_rounds_with_a_private_passive_segmenter(tiny_federation, tmp_path, simulate):
    trains = simulate(tiny_federation, tmp_path / "run",
                      ["recipe=red-gan", "options.seg-train=private", "num-rounds=2", "local-steps=1",
                       "image-size=32", "batch-size=4", "accountant=rdp", "target-epsilon=8.0", "eval-every=0",
                       "options.gen-width=4", "options.disc-width=4", "options.seg-width=4",
                       "options.seg-pretrain-steps=2"], timeout=900)
    assert [t["round"] for t in trains] == [1, 2]
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
