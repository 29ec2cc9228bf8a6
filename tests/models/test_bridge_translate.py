"""bridge-translate: the privacy properties, the translation math, a 2-round federated run.

Synthetic anatomy: ellipse label maps; a site's image = a fixed intensity per tissue
class + noise (16-32 px, few steps).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from medgen.config import ConfigError, RunConfig
from medgen.models.bridge_translate import (BridgeTranslator, SiteStyle, style_clip,
                                            patient_style_statistics, style_from_images,
                                            style_from_statistics, style_reference_counts,
                                            translate)
from medgen.models.dp_cgan import disc_loss
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan
from medgen.sim.random_contrast import gaussian_blur

T1 = (-1.0, -0.5, 0.1, 0.8)  # background, CSF, GM, WM
T2 = (-1.0, 0.8, 0.1, -0.5)
SMALL = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "seg-steps-per-round": 2, "seg-pretrain-steps": 2,
         "seg-batch-size": 4, "style-samples": 8, "seg-generated-from-round": 1}

STYLE_CLIP = style_clip(4)  # the brain fixtures' 4 classes


def ellipses(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.7 + 0.2 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.75], out[i][r < 0.4], out[i][r < 0.06] = 1, 2, 3, 1
    return out


def render(labels: torch.Tensor, contrast, seed: int, noise: float = 0.03) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.tensor(contrast)[labels] + noise * torch.randn(labels.shape, generator=gen)).clamp(-1, 1)[:, None]


def setup(size=16, n=16, batch=4, options=None):
    config = RunConfig(recipe="bridge-translate", image_size=size, batch_size=batch, sites="A,B",
                       seed=0, options={**SMALL, **(options or {})})
    recipe = build_recipe(config)
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp",
                       sample_rate=sample_rate_for(n, batch), total_steps=100,
                       noise_multiplier=1.0, max_grad_norm=1.0, releases=recipe.one_off_releases())
    return recipe, PublicData(ellipses(24, size, seed=99)), plan


def site_data(n: int, size: int, contrast, seed: int) -> TensorDataset:
    labels = ellipses(n, size, seed)
    return TensorDataset(render(labels, contrast, seed), labels)


def train(recipe, model, data, public, private, site, steps, state, seed=0):
    """One round of ``train_local`` as the node runs it (a RoundContext)."""
    return recipe.train_local(model, RoundContext(data, public, private, site, steps, state, "cpu", seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_registry_options_and_what_travels():
    recipe, _, _ = setup()
    assert isinstance(recipe, BridgeTranslator)
    assert recipe.options.seg_steps_per_round == 2 and recipe.foundation.options.gen_width == 4
    model = recipe.build()
    shared = recipe.shared_keys(model)
    assert shared and all(k.startswith(("cgan.gen.", "seg.", "style_release")) for k in shared)
    assert any(k.startswith("seg.") for k in shared) and "style_release" in shared
    assert "style_release" in recipe.site_indexed_keys  # row k from site k's reply only
    style = (recipe.options.style_noise_multiplier, 1.0, 1)
    assert style == (1.0, 1.0, 1) and style in recipe.one_off_releases()
    off = build_recipe(RunConfig(recipe="bridge-translate", options={"style-release": False}))
    assert style not in off.one_off_releases()
    assert all(k.startswith("cgan.disc.") for k in recipe.local_only_state(model))  # D stays home
    assert recipe.private_modules == ("cgan.disc",)
    with pytest.raises(ConfigError, match="no option 'bogus'"):
        build_recipe(RunConfig(recipe="bridge-translate", options={"bogus": 1}))
    with pytest.raises(ConfigError, match="options.seg-init must be a string"):
        build_recipe(RunConfig(recipe="bridge-translate", options={"seg-init": 5}))


def test_each_site_trainer_gets_only_its_own_data_and_only_d_is_made_private(monkeypatch):
    recipe, public, plan = setup()
    seen = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        seen.append((module, dataset))
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model = recipe.build()
    sites = {0: site_data(16, 16, T1, 1), 1: site_data(16, 16, T2, 2)}
    for index, data in sites.items():
        train(recipe, model, data, public, PrivateTraining(plan, [], seed=index), index, 2, {}, seed=index)
    assert [d for _, d in seen] == [sites[0], sites[1]]  # identity: nothing else reaches DP-SGD
    assert all(m is model.cgan.disc for m, _ in seen)


def test_segmenter_update_reads_only_public_and_generated_inputs():
    """S's update must not depend on D (the only part that saw private data) nor on any
    dataset: two models whose D differs give bit-identical S after the public update."""
    recipe, public, _ = setup()
    a = recipe.build()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.cgan.disc.parameters():
            p.add_(torch.randn_like(p))
    recipe.public_segmenter_update(a, public, 3, {}, seed=5, device=torch.device("cpu"))
    recipe.public_segmenter_update(b, public, 3, {}, seed=5, device=torch.device("cpu"))
    sa, sb = a.seg.state_dict(), b.seg.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], v) for k, v in recipe.build().seg.state_dict().items())  # it trained
    # and every label map in S's batches is a public map (up to the flip)
    images, labels = recipe.public_batch(a, public, 3, 2, torch.Generator().manual_seed(0))
    bank = public.label_maps
    for lab in labels:
        assert any(torch.equal(lab, m) or torch.equal(lab.flip(-1), m) for m in bank)
    assert images.shape == (5, 1, 16, 16)


def test_private_network_per_sample_grads_match_autograd_loop():
    recipe, _, plan = setup()
    model = recipe.build()
    data = site_data(16, 16, T1, 3)  # the plan's sample rate is for 16 patients at batch 4
    images, labels = data.tensors[0][:6], data.tensors[1][:6]
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    site = torch.zeros(6, dtype=torch.long)

    def one_record_loss(module, image, lab, s):
        return disc_loss(module(image, lab, s), real=True, kind="nonsat").mean()

    expected = per_sample_grads_reference(copy.deepcopy(model.cgan.disc), one_record_loss, images, onehot, site)
    private = PrivateTraining(plan, [], seed=0)
    disc, dp_opt, _ = private.make_private(model.cgan.disc, torch.optim.SGD(model.cgan.disc.parameters(), lr=0.1),
                                           data, 4)
    disc_loss(disc(images, onehot, site), real=True, kind="nonsat").mean().backward()
    got = [p.grad_sample for p in dp_opt.params]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (g - e).abs().max()
    private.close()


def test_style_measurement_recovers_means_and_blur():
    labels = ellipses(12, 32, 4)
    flat = torch.tensor(T2)[labels][:, None]
    style = style_from_images(gaussian_blur(flat, torch.full((12,), 1.0)), labels)
    assert style.blur_px == pytest.approx(1.0, abs=0.26)
    sharp = style_from_images(flat, labels)
    assert sharp.blur_px == 0.0 and sharp.tissue_means == pytest.approx(T2, abs=1e-5)


class OracleSegmenter(torch.nn.Module):
    """Returns confident logits of known label maps (stands in for a perfect S)."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.labels = labels
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return 20.0 * torch.nn.functional.one_hot(self.labels, 4).permute(0, 3, 1, 2).float() + 0 * self.dummy


def test_translation_maps_contrast_and_flips_texture():
    labels = ellipses(8, 32, 5)
    texture = 0.08 * gaussian_blur(torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
                                   torch.full((8,), 1.5))
    inside = (labels > 0)[:, None]
    source = torch.tensor(T1)[labels][:, None] + texture * inside
    target = torch.tensor(T2)[labels][:, None] - 1.3 * texture * inside  # T2 flips texture
    seg = OracleSegmenter(labels)
    styles = (SiteStyle(T1, 0.0), SiteStyle(T2, 0.0))
    before = source.clone()
    # no residual filtering here: the synthetic texture has no noise or bias to remove
    with_texture = translate(seg, source, *styles, texture_smooth_px=0.0, texture_detrend_px=0.0)
    flat = translate(seg, source, *styles, carry_texture=False)
    assert torch.equal(source, before)  # input untouched

    def error(image):  # inside the brain, where the texture is
        return float(((image - target)[inside] ** 2).mean())

    assert error(with_texture) < 0.2 * error(flat)
    # the texture is carried with the sign of the contrast map (negative for T1 -> T2)
    residual = (with_texture - flat)[inside]
    assert torch.corrcoef(torch.stack([residual, texture[inside]]))[0, 1] < -0.9


@pytest.mark.slow
def test_two_round_federated_run_on_tiny_images():
    """Two rounds, two sites: local DP training, FedAvg of the shared keys, then translation."""
    recipe, public, plan = setup(size=16)
    global_model = recipe.build()
    sites = [site_data(16, 16, T1, 1), site_data(16, 16, T2, 2)]
    states = [{}, {}]
    histories, released = [[], []], [[], []]
    local_models = [copy.deepcopy(global_model) for _ in sites]
    for round_ in range(2):
        shared = []
        for k, data in enumerate(sites):
            local = local_models[k]
            local.load_state_dict({**local.state_dict(), **recipe.shared_state(global_model)})
            private = PrivateTraining(plan, histories[k], seed=k, released=released[k])
            metrics = train(recipe, local, data, public, private, k, 3, states[k], seed=10 * round_ + k)
            histories[k], released[k] = private.history, released[k] + list(private.new_releases)
            assert set(metrics) >= {"loss_gen", "loss_seg_public"}
            assert all(isinstance(v, float) for v in metrics.values())
            shared.append(recipe.shared_state(local))
        averaged = {key: torch.stack([s[key].float() for s in shared]).mean(0).to(shared[0][key].dtype)
                    for key in shared[0]}
        for key in recipe.site_indexed_keys:  # row k from site k (server/strategy.py)
            averaged[key] = torch.stack([shared[k][key][k] for k in range(2)])
        global_model.load_state_dict({**global_model.state_dict(), **averaged})
    assert states[0]["rounds_trained"] == 2 and "opt_seg" in states[0]
    # one release per site, in the first round, before its DP-SGD steps
    assert all(sum(1 for e in h if tuple(e) == (1.0, 1.0, 1)) == 1 for h in histories)
    assert all(recipe.has_released_style(global_model, k) for k in range(2))
    assert all(0 < PrivateTraining(plan, h).epsilon(1e-5) < 100 for h in histories)
    styles = recipe.site_styles(global_model, public)
    out = recipe.translate_images(global_model, sites[0].tensors[0][:4], styles["A"], styles["B"])
    assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
    assert recipe.gan_translate(global_model, sites[0].tensors[0][:4], 1).shape == (4, 1, 16, 16)


def test_random_contrast_rendering_is_seeded_varied_and_leaves_labels_alone():
    from medgen.sim.random_contrast import render_random_contrast

    labels = ellipses(64, 32, 6)
    before = labels.clone()
    a = render_random_contrast(labels, torch.Generator().manual_seed(1))
    b = render_random_contrast(labels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(labels, before)
    assert a.shape == (64, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    wm, csf = [torch.stack([a[i, 0][labels[i] == c].mean() for i in range(64)]) for c in (3, 1)]
    flipped = (wm < csf).float().mean()
    assert 0.2 < flipped < 0.8  # T1-like and T2-like orderings both occur
    with pytest.raises(ValueError, match="0..3"):
        render_random_contrast(labels + 4, torch.Generator())


# -- the DP style release ---------------------------------------------------------------
def test_patient_statistics_are_in_the_clip_bound_and_handle_missing_classes():
    labels = ellipses(6, 16, 8)
    labels[0][labels[0] == 1] = 2  # patient 0 has no CSF
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images[1] = 1.0  # extreme but in range
    v = patient_style_statistics(images, labels, num_classes=4)
    assert v.shape == (6, 10) and bool((v.norm(dim=1) <= STYLE_CLIP + 1e-9).all())
    assert v[0, 2] == 0 and v[0, 6] == 0 and v[1, 6] == 1  # absent class: no mean, no count
    assert torch.equal(v[:, 0], torch.ones(6))


def test_noiseless_release_equals_the_central_measurement():
    """sigma_style -> 0: the released style is the central measurement. Exact where every
    patient's tissue is uniform (per-patient and per-pixel weighting agree); with noise and
    bias they differ slightly (per-patient means are averaged per patient, style_from_images
    pools pixels; the blur is the mean per-patient best fit, not the pooled best fit)."""
    labels = ellipses(12, 32, 4)
    labels[3][labels[3] == 1] = 2  # a patient without CSF does not bias the CSF mean
    flat = torch.tensor(T2)[labels][:, None]
    blurred = gaussian_blur(flat, torch.full((12,), 1.0))
    for images, blur in ((flat, 0.0), (blurred, None)):
        released = style_from_statistics(patient_style_statistics(images, labels, num_classes=4).sum(0))
        central = style_from_images(images, labels)
        assert released.tissue_means == pytest.approx(central.tissue_means, abs=1e-6 if blur == 0 else 0.02)
        assert released.blur_px == pytest.approx(central.blur_px, abs=1e-9 if blur == 0 else 0.26)
    noisy = render(labels, T1, seed=3, noise=0.05)
    released = style_from_statistics(patient_style_statistics(noisy, labels, num_classes=4).sum(0))
    assert released.tissue_means == pytest.approx(style_from_images(noisy, labels).tissue_means, abs=0.01)
    assert released.tissue_means[1:] == pytest.approx(T1[1:], abs=0.02)  # background clamps at -1


def test_area_weights_move_the_released_mean_to_the_pixel_pooled_mean():
    """Oracle: with reference counts above every tissue's area, w_k = n_k / ref_k, and the
    released mean sum_i m_ik w_ik / sum_i w_ik is exactly the pixel-pooled mean of
    style_from_images; with tiny reference counts every w_k = 1 (the presence weighting).
    Whatever the weights, every row stays within STYLE_CLIP."""
    labels = ellipses(12, 32, 4)
    images = render(labels, T1, seed=3, noise=0.05)
    images[:4] = images[:4] * 0.5  # patients differ, so the two weightings disagree
    pooled = style_from_images(images, labels).tissue_means
    total = patient_style_statistics(images, labels, torch.full((4,), 32.0 * 32.0), num_classes=4).sum(0)
    by_area = (total[1:5] / total[5:9]).tolist()  # style_from_statistics' ratio (its count floor aside)
    assert by_area == pytest.approx(pooled, abs=1e-6)
    by_presence = patient_style_statistics(images, labels, num_classes=4)
    assert torch.equal(patient_style_statistics(images, labels, torch.full((4,), 1e-3), num_classes=4), by_presence)
    per_patient = style_from_statistics(by_presence.sum(0)).tissue_means
    assert max(abs(a - b) for a, b in zip(per_patient, pooled)) > 1e-3  # the weighting matters here
    weighted = patient_style_statistics(images, labels, torch.tensor([500.0, 60.0, 200.0, 80.0]), num_classes=4)
    assert (weighted.norm(dim=1) <= STYLE_CLIP + 1e-9).all()
    assert ((weighted[:, 5:9] >= 0) & (weighted[:, 5:9] <= 1)).all()
    # reference counts are quantiles of the PUBLIC maps' tissue areas
    maps = ellipses(9, 16, 7)
    counts = torch.nn.functional.one_hot(maps, 4).sum(dim=(1, 2)).double()
    assert torch.allclose(style_reference_counts(maps, 0.5, 4), counts.median(dim=0).values)


def test_each_site_releases_only_its_own_statistics_once(monkeypatch):
    recipe, public, plan = setup()
    released = []
    original = PrivateTraining.gaussian_release

    def spy(self, vectors, clip_norm, noise_multiplier):
        if noise_multiplier == recipe.options.style_noise_multiplier:  # not the foundation's own
            released.append((vectors.clone(), clip_norm, noise_multiplier))
        return original(self, vectors, clip_norm, noise_multiplier)

    monkeypatch.setattr(PrivateTraining, "gaussian_release", spy)
    model = recipe.build()
    sites = {0: site_data(16, 16, T1, 1), 1: site_data(16, 16, T2, 2)}
    states, histories, stored = {0: {}, 1: {}}, {0: [], 1: []}, {0: (), 1: ()}
    for index, data in sites.items():
        before = model.style_release.clone()
        private = PrivateTraining(plan, [], seed=index)
        train(recipe, model, data, public, private, index, 2, states[index], seed=index)
        histories[index], stored[index] = private.history, private.new_releases
        # this site's patients, one row each, area weights from the PUBLIC maps' median areas
        reference = style_reference_counts(public.label_maps, recipe.options.style_weight_quantile, 4)
        own = patient_style_statistics(*data.tensors, reference, num_classes=4)
        assert torch.equal(released[-1][0], own)
        assert released[-1][1:] == (STYLE_CLIP, 1.0)
        others = [k for k in range(2) if k != index]
        assert torch.equal(model.style_release[others], before[others])  # other rows untouched
        style = [r for r in stored[index] if r.noise_multiplier == 1.0]  # the ledger's one copy
        assert style and list(style[0].values) == pytest.approx(model.style_release[index].tolist())
        assert "style_release" not in states[index]  # not a second copy in the node's state
        assert private.history.count((1.0, 1.0, 1)) == 1
        assert private.accounted_steps == 2 + sum(1 for e in private.history if e[1] == 1.0)
    assert len(released) == 2
    # the rows are the noisy sums (noise std 1 x sqrt(10) per entry), and the style comes from them
    for index, data in sites.items():
        noise = model.style_release[index].double() - patient_style_statistics(*data.tensors, reference, num_classes=4).sum(0)
        assert 0 < float(noise.abs().max()) < 6 * 1.0 * STYLE_CLIP
    assert recipe.site_style(model, public, 1) == style_from_statistics(model.style_release[1])
    # later rounds reuse the release values the ledger stored: nothing more is spent
    for index, data in sites.items():
        private = PrivateTraining(plan, histories[index], seed=10 + index, released=stored[index])
        train(recipe, model, data, public, private, index, 1, states[index], seed=10 + index)
        assert private.accounted_steps == 1
    fresh = recipe.build()  # the row lost (e.g. a server restart): restored from the ledger
    private = PrivateTraining(plan, histories[0], seed=20, released=stored[0])
    train(recipe, fresh, sites[0], public, private, 0, 1, states[0], seed=20)
    assert len(released) == 2 and torch.equal(fresh.style_release[0], model.style_release[0])
    # the ledger's values lost too: a second release would spend twice, and is refused
    with pytest.raises(RuntimeError, match="already in this site's privacy history"):
        train(recipe, recipe.build(), sites[0], public, PrivateTraining(plan, histories[0]), 0, 1, {})


def test_seg_init_loads_the_coordinators_segmenter_and_the_sites_keep_it(tmp_path):
    """options.seg-init: the coordinator's S goes into the initial model (``initialise``),
    and a site's first round does not pretrain over it."""
    from medgen.atomic import atomic_torch_save

    donor = setup(size=16)[0].build().seg
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "S.pt"
    atomic_torch_save(path, donor.state_dict())
    recipe, public, plan = setup(size=16, options={"seg-init": str(path), "seg-steps-per-round": 0})
    model = recipe.build()
    recipe.initialise(model)
    assert all(torch.equal(a, b) for a, b in zip(model.seg.state_dict().values(), donor.state_dict().values()))
    train(recipe, model, site_data(16, 16, T1, 1), public, PrivateTraining(plan, [], seed=0), 0, 2, {})
    assert all(torch.equal(a, b) for a, b in zip(model.seg.state_dict().values(), donor.state_dict().values()))
    # without seg-init the same first round pretrains S (seg-pretrain-steps = 2)
    plain, _, _ = setup(size=16, options={"seg-steps-per-round": 0})
    other = plain.build()
    start = copy.deepcopy(other.seg.state_dict())
    train(plain, other, site_data(16, 16, T1, 1), public, PrivateTraining(plan, [], seed=0), 0, 2, {})
    assert not all(torch.equal(a, b) for a, b in zip(other.seg.state_dict().values(), start.values()))


def test_several_seg_init_paths_make_an_ensemble_filled_in_order(tmp_path):
    from medgen.atomic import atomic_torch_save
    from medgen.models.segmenter import SegmenterEnsemble

    single = setup(size=16)[0]
    paths = []
    for i in range(2):
        donor = single.build().seg
        with torch.no_grad():
            for p in donor.parameters():
                p.fill_(0.01 * (i + 1))
        paths.append(tmp_path / f"S{i}.pt")
        atomic_torch_save(paths[-1], donor.state_dict())
    recipe, _, _ = setup(size=16, options={"seg-init": f"{paths[0]}, {paths[1]}"})
    model = recipe.build()
    assert isinstance(model.seg, SegmenterEnsemble) and len(model.seg.members) == 2
    recipe.initialise(model)
    for i, member in enumerate(model.seg.members):
        assert all(torch.equal(v, torch.load(paths[i], weights_only=True)[k]) for k, v in member.state_dict().items())
    assert any(k.startswith("seg.members.1.") for k in recipe.shared_keys(model))  # both travel


def test_seg_init_errors_name_the_option_and_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    recipe, _, _ = setup(options={"seg-init": str(missing)})
    with pytest.raises(ConfigError, match="options.seg-init: .*nope.pt does not exist.*pretrain-segmenter"):
        recipe.initialise(recipe.build())
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    recipe, _, _ = setup(options={"seg-init": str(wrong)})
    with pytest.raises(ConfigError, match="wrong.pt is not a state dict of the bridge's segmenter"):
        recipe.initialise(recipe.build())


@pytest.mark.slow
def test_flower_simulation_ships_the_coordinators_segmenter(tiny_federation, tmp_path, simulate):
    """`medgen pretrain-segmenter`, then `medgen-server simulate --set recipe=bridge-translate
    --set options.seg-init=S.pt`: 2 rounds, 2 sites, 32 px through Flower. With no public S
    steps per round, the global S after round 2 is bit-for-bit the coordinator's file: the
    server shipped it and no site pretrained over it."""
    from medgen.models.segmenter_pretrain import main as pretrain_main
    from medgen.server.checkpoint import load_checkpoint

    s_path = tmp_path / "S.pt"
    assert pretrain_main(["--public", str(tiny_federation / "public"), "--out", str(s_path),
                          "--steps", "2", "--image-size", "32"]) == 0
    out = tmp_path / "run"
    settings = ["recipe=bridge-translate", "num-rounds=2", "local-steps=2", "image-size=32", "batch-size=4",
                "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "options.gen-width=4",
                "options.disc-width=4", "options.noise-dim=8", "options.seg-steps-per-round=0",
                "options.style-samples=8", f"options.seg-init={s_path}"]
    trains = simulate(tiny_federation, out, settings, timeout=900)
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None and checkpoint.server_round == 2
    shipped = torch.load(s_path, weights_only=True)
    assert all(torch.equal(checkpoint.shared_state[f"seg.{k}"], v) for k, v in shipped.items())
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in trains]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
