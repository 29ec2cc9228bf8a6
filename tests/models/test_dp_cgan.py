"""dp-cgan: DP plumbing, the post-processing property of G, sampling, and that G learns.

Tiny images (16-32 px), few steps; synthetic anatomy: ellipse label maps, and a site's
image = a fixed intensity per tissue class + noise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from medgen.config import RunConfig
from medgen.models.blocks import one_hot_labels
from medgen.models.dp_cgan import DPConditionalGAN, disc_loss
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule, clip_total_norm
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

SITE_INTENSITY = (-0.9, 0.7, 0.1, -0.4)  # background, CSF, GM, WM


def label_maps(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.75 + 0.15 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.8], out[i][r < 0.45], out[i][r < 0.08] = 1, 2, 3, 1
    return out


def site_images(labels: torch.Tensor, intensity=SITE_INTENSITY, seed: int = 0) -> torch.Tensor:
    noise = 0.05 * torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    return (torch.tensor(intensity)[labels] + noise).clamp(-1, 1).unsqueeze(1)


def class_means(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([images[:, 0][labels == c].mean() for c in range(4)])


def setup(size=16, n=24, batch=8, noise=1.0, seed=0, options=None, intensity=SITE_INTENSITY):
    config = RunConfig(image_size=size, batch_size=batch, sites="A,B", seed=0, options=options or {})
    recipe = build_recipe(config)
    labels = label_maps(n, size, seed)
    data = TensorDataset(site_images(labels, intensity, seed), labels)
    public = PublicData(label_maps(40, size, seed=1000))
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp",
                       sample_rate=sample_rate_for(n, batch), total_steps=1000,
                       noise_multiplier=noise, max_grad_norm=1.0,
                       releases=recipe.one_off_releases())
    return recipe, data, public, plan


def train(recipe, model, data, public, private, site, steps, state, seed=0):
    """One round of ``train_local`` as the node runs it (a RoundContext)."""
    return recipe.train_local(model, RoundContext(data, public, private, site, steps, state, "cpu", seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_registry_builds_the_recipe_with_options():
    recipe = build_recipe(RunConfig(recipe="dp-cgan", image_size=32,
                                    options={"disc-width": 8, "loss": "hinge"}))
    assert isinstance(recipe, DPConditionalGAN) and recipe.name == "dp-cgan"
    assert recipe.options.disc_width == 8 and recipe.options.loss == "hinge"
    model = recipe.build()
    assert model.disc.stages[0].conv.out_channels == 8
    # deterministic initialisation: two builds are identical
    other = recipe.build().state_dict()
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items())


def test_shared_keys_are_exactly_the_generator_by_default():
    recipe, *_ = setup()
    model = recipe.build()
    keys = recipe.shared_keys(model)
    gen_keys = [k for k in model.state_dict() if k.startswith("gen.")]
    assert keys == gen_keys and len(keys) > 10
    assert set(recipe.local_only_state(model)) == {k for k in model.state_dict() if k.startswith("disc.")}
    assert recipe.private_modules == ("disc",)
    shared_all = build_recipe(RunConfig(options={"share-discriminator": True}))
    assert set(shared_all.shared_keys(shared_all.build())) == set(shared_all.build().state_dict())


@pytest.mark.parametrize("channels_last", [False, True])
def test_private_disc_per_sample_grads_match_autograd_loop(channels_last):
    recipe, data, public, plan = setup(size=16, n=6, batch=6)
    model = recipe.build()
    reference_disc = copy.deepcopy(model.disc)
    images, labels = data.tensors
    onehot = one_hot_labels(labels, 4)
    site = torch.tensor([0, 1, 0, 1, 0, 1])
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        onehot = onehot.contiguous(memory_format=torch.channels_last)

    def one_record_loss(module, image, lab, s):
        return disc_loss(module(image, lab, s), real=True, kind="nonsat").mean()

    expected = per_sample_grads_reference(reference_disc, one_record_loss, images, onehot, site)
    private = PrivateTraining(plan, [], seed=0)
    disc, dp_opt, _ = private.make_private(model.disc, torch.optim.SGD(model.disc.parameters(), lr=0.1),
                                           data, 6)
    disc_loss(disc(images, onehot, site), real=True, kind="nonsat").mean().backward()
    got = [p.grad_sample for p in dp_opt.params]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (g - e).abs().max()


def _gen_after_one_d_and_g_step(data, recipe, public, plan, disc_state):
    """A D step on ``data`` (private records flow), then D reset to ``disc_state``, then one G step."""
    torch.manual_seed(0)
    model = recipe.build()
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=1e-2)
    private = PrivateTraining(plan, [], seed=0)
    with DPModule(private, model.disc, torch.optim.Adam(model.disc.parameters()), data, 8) as d:
        images, labels = data.tensors[0][:8], data.tensors[1][:8]
        rng = torch.Generator().manual_seed(5)
        recipe.disc_step(model, d, images, labels, public, 0, rng, torch.device("cpu"))
        model.disc.load_state_dict(disc_state)  # "the same D parameters"
        recipe.gen_step(model, d, opt_g, public, 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    return model.gen.state_dict()


def test_generator_update_does_not_depend_on_private_data():
    recipe, data_a, public, plan = setup(seed=0)
    _, data_b, _, _ = setup(seed=99, intensity=(0.5, -0.8, 0.9, 0.0))
    assert not torch.equal(data_a.tensors[1], data_b.tensors[1])
    disc_state = copy.deepcopy(recipe.build().disc.state_dict())
    gen_a = _gen_after_one_d_and_g_step(data_a, recipe, public, plan, disc_state)
    gen_b = _gen_after_one_d_and_g_step(data_b, recipe, public, plan, disc_state)
    initial = recipe.build().gen.state_dict()
    assert any(not torch.equal(gen_a[k], initial[k]) for k in gen_a), "the G step did not train G"
    for key in gen_a:
        assert torch.equal(gen_a[key], gen_b[key]), f"G parameter {key} depends on the private data"


def test_generator_step_refuses_unreleased_private_state_on_disc():
    recipe, data, public, plan = setup()
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    with DPModule(private, model.disc, torch.optim.Adam(model.disc.parameters()), data, 8) as d:
        images, labels = data.tensors[0][:8], data.tensors[1][:8]
        logits = d.module(images, one_hot_labels(labels, 4), torch.zeros(8, dtype=torch.long))
        disc_loss(logits, real=True, kind="nonsat").mean().backward()  # per-sample grads, not yet noised
        opt_g = torch.optim.Adam(model.gen.parameters())
        with pytest.raises(AssertionError, match="grad_sample"):
            recipe.gen_step(model, d, opt_g, public, 0, torch.Generator().manual_seed(0),
                            torch.device("cpu"))


@pytest.mark.parametrize("steps,n_critic,gen_steps", [(3, 2, 1), (1, 5, 1), (4, 1, 4)])
def test_train_local_takes_exactly_steps_private_steps(steps, n_critic, gen_steps):
    recipe, data, public, plan = setup(options={"disc-steps-per-gen-step": n_critic})
    model = recipe.build()
    prior = [(plan.noise_multiplier, plan.sample_rate, 5)]
    private = PrivateTraining(plan, prior, seed=0)
    state: dict = {}
    metrics = train(recipe, model, data, public, private, 1, steps, state)
    assert private.steps_taken == steps
    assert sum(h[2] for h in private.history) == 5 + steps + 1  # + the one moment release
    assert metrics["disc_steps"] == steps and metrics["gen_steps"] == gen_steps
    # only public-input quantities leave: no loss or score on the private batch
    assert set(metrics) == {"loss_gen", "disc_fake_score", "loss_disc_fake", "disc_steps",
                            "gen_steps", "seconds"}
    assert all(isinstance(v, float) for v in metrics.values())
    # the model is left clean (no Opacus hooks) and the optimizer states persist
    assert not hasattr(model.disc, "autograd_grad_sample_hooks")
    assert {"opt_gen", "opt_disc"} <= set(state) and state["rounds_trained"] == 1
    again = PrivateTraining(plan, private.history, seed=1, released=private.new_releases)
    train(recipe, model, data, public, again, 1, 1, state)
    # the next round reuses the release: one more step, no second release
    assert state["rounds_trained"] == 2 and sum(h[2] for h in again.history) == 5 + steps + 1 + 1


def test_fake_count_is_fixed_whatever_the_poisson_batch_size(monkeypatch):
    recipe, data, public, plan = setup(n=24, batch=8)
    model = recipe.build()
    real_sizes, fake_sizes = [], []
    original_disc_step, original_draw = DPConditionalGAN.disc_step, PublicData.draw

    def spy_disc_step(self, model, d, images, *args):
        real_sizes.append(images.shape[0])
        return original_disc_step(self, model, d, images, *args)

    def spy_draw(self, n, generator=None):
        fake_sizes.append(n)
        return original_draw(self, n, generator)

    monkeypatch.setattr(DPConditionalGAN, "disc_step", spy_disc_step)
    monkeypatch.setattr(PublicData, "draw", spy_draw)
    train(recipe, model, data, public, PrivateTraining(plan, [], seed=3), 0, 12, {})
    assert len(set(real_sizes)) > 1, "the Poisson batch sizes did not vary: the test proves nothing"
    assert fake_sizes and set(fake_sizes) == {8}


def test_empty_poisson_batch_takes_an_accounted_noise_only_step():
    recipe, data, public, plan = setup()
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    before = copy.deepcopy(model.disc.state_dict())
    empty_images, empty_labels = torch.zeros(0, 1, 16, 16), torch.zeros(0, 16, 16, dtype=torch.long)
    with DPModule(private, model.disc, torch.optim.SGD(model.disc.parameters(), lr=0.1), data, 8) as d:
        recipe.disc_step(model, d, empty_images, empty_labels, public, 0,
                         torch.Generator().manual_seed(0), torch.device("cpu"))
    assert private.steps_taken == 1
    assert any(not torch.equal(v, model.disc.state_dict()[k]) for k, v in before.items())


def test_sample_shape_range_and_site_conditioning():
    recipe = build_recipe(RunConfig(image_size=32, sites="A,B,C"))
    model = recipe.build()
    labels = label_maps(3, 32, seed=4)

    def draw(site):
        return recipe.sample(model, labels, torch.full((3,), site), torch.Generator().manual_seed(1))

    a, a_again, b = draw(0), draw(0), draw(2)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, a_again)
    assert (a - b).abs().mean() > 1e-3, "the site id does not change the output"
    other_labels = recipe.sample(model, label_maps(3, 32, seed=5), torch.zeros(3, dtype=torch.long),
                                 torch.Generator().manual_seed(1))
    assert (a - other_labels).abs().mean() > 1e-3, "the label map does not change the output"
    with pytest.raises(ValueError, match="label values"):
        recipe.sample(model, torch.full((1, 32, 32), 7), torch.zeros(1, dtype=torch.long))


def test_short_training_learns_the_site_tissue_intensities():
    """Through the DP pipeline (small noise), G must learn the site's per-tissue intensity.

    A generator that ignores the label map can at best paint one global intensity: its
    class-mean error is about 0.45 here; the untrained one is about 0.5.
    """
    torch.manual_seed(0)
    recipe, data, public, plan = setup(size=16, n=64, batch=16, noise=0.1,
                                       options={"lr-gen": 2e-3, "lr-disc": 2e-3,
                                                "disc-steps-per-gen-step": 1})
    model = recipe.build()
    eval_labels = label_maps(32, 16, seed=2000)
    target = class_means(site_images(eval_labels), eval_labels)

    def error():
        fake = recipe.sample(model, eval_labels, torch.zeros(32, dtype=torch.long),
                             torch.Generator().manual_seed(0))
        return (class_means(fake, eval_labels) - target).abs().mean().item()

    untrained = error()
    state: dict = {}
    history: list = []
    released: list = []  # the ledger's stored release values
    for round_ in range(4):  # a few "rounds", node state carried as the client does
        private = PrivateTraining(plan, history, seed=round_, released=released)
        train(recipe, model, data, public, private, 0, 40, state, seed=round_)
        history, released = private.history, released + list(private.new_releases)
    trained = error()
    assert trained < 0.25 and trained < 0.5 * untrained, (untrained, trained)


def test_fake_term_gradient_is_bounded_by_the_clipping_norm_and_keeps_its_direction():
    big = [torch.tensor([3.0, 4.0]), None, torch.tensor([[12.0]])]   # total norm 13
    clipped = clip_total_norm(big, 1.0)
    assert clipped[1] is None
    total = torch.sqrt(sum((g ** 2).sum() for g in clipped if g is not None))
    assert float(total) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped[0] * 13.0, big[0]) and torch.allclose(clipped[2] * 13.0, big[2])
    small = [torch.tensor([0.3, 0.4])]
    assert torch.equal(clip_total_norm(small, 1.0)[0], small[0])    # below C: untouched



def test_moment_release_rows_and_targets_are_the_per_patient_tissue_statistics():
    from medgen.models.blocks import one_hot_labels, tissue_statistics
    from medgen.models.scanner_moments import MOMENT_CLIP, moments_from_release, patient_moments

    labels = label_maps(12, 16, seed=3)
    images = site_images(labels, seed=3)
    rows = patient_moments(images, labels, 4)
    assert rows.shape == (12, 15) and (rows.norm(dim=1) < MOMENT_CLIP).all()  # scans: never clipped
    # noise-free sum -> exactly the mean of the per-image statistics (every class present)
    expected = tissue_statistics(images, one_hot_labels(labels, 4)).mean(dim=0)
    assert torch.allclose(moments_from_release(rows.sum(dim=0)), expected, atol=1e-5)
    # a class absent from some images is averaged over the images having it only
    labels[:6][labels[:6] == 1] = 2
    rows = patient_moments(site_images(labels, seed=3), labels, 4)
    assert rows[:6, 1 + 2 * 4 + 1].sum() == 0 and rows[6:, 1 + 2 * 4 + 1].sum() == 6
    csf = moments_from_release(rows.sum(dim=0))[1]
    assert csf == pytest.approx(SITE_INTENSITY[1], abs=0.05)


def test_moment_release_is_made_once_accounted_and_only_from_the_sites_own_data():
    recipe, data, public, plan = setup()
    assert recipe.one_off_releases() == ((3.0, 1.0, 1),)
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    state: dict = {}
    train(recipe, model, data, public, private, 1, 2, state)
    assert (3.0, 1.0, 1) in private.history and private.accounted_steps == 3
    row = model.gen.site_moments[1]
    (release,) = private.new_releases  # what the ledger stores with the round's commit
    assert torch.allclose(row, torch.tensor(release.values, dtype=row.dtype))
    assert model.gen.site_moments[0].abs().sum() == 0  # site B (index 1) wrote its own row only
    # the released count is the number of patients plus Gaussian noise of sd 3 * MOMENT_CLIP
    assert abs(float(row[0]) - len(data)) < 5 * 3.0 * 4.0
    # the release travels with G and the server keeps each site's own row
    assert "gen.site_moments" in recipe.shared_keys(model)
    assert "gen.site_moments" in recipe.site_indexed_keys
    # a second round on the same node (the ledger passes its stored values): no new release
    again = PrivateTraining(plan, private.history, seed=1, released=private.new_releases)
    fresh = recipe.build()  # even into a model whose row was lost: the ledger's values come back
    train(recipe, fresh, data, public, again, 1, 1, state)
    assert again.accounted_steps == 1 and torch.equal(fresh.gen.site_moments[1], row)
    # without the stored values a second release would spend twice: refused
    with pytest.raises(RuntimeError, match="already in this site's privacy history"):
        train(recipe, recipe.build(), data, public, PrivateTraining(plan, private.history), 1, 1, {})


def test_without_moment_release_nothing_is_released():
    recipe, data, public, plan = setup(options={"moment-release": False})
    assert recipe.one_off_releases() == ()
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    train(recipe, model, data, public, private, 0, 2, {})
    assert private.accounted_steps == 2 and model.gen.site_moments.abs().sum() == 0
