"""spcycle-gan: the DP argument (which updates depend on which data), the accounting, a
2-round Flower simulation and `medgen translate` on real NIfTI files with its checkpoint.

Synthetic anatomy: ellipse label maps; a site's image = a fixed intensity per tissue
class + noise (16 px, 4-channel networks, few steps).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.client.translate import Translator, translate_site
from medgen.config import ConfigError, RunConfig
from medgen.data.nifti_io import read_physical_nifti, write_physical_nifti
from medgen.models.capabilities import Translation, declares
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.models.spcycle_gan import SPCycleGAN
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan
from medgen.privacy.round import PrivacyRound, PrivacySchedule
from medgen.server.checkpoint import load_checkpoint

T1 = (-1.0, -0.5, 0.1, 0.8)  # background and three tissues
T2 = (-1.0, 0.8, 0.1, -0.5)
SMALL = {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "seg-pretrain-steps": 0, "public-eval-samples": 0}
SIZE, N, BATCH = 16, 16, 4


def ellipses(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.7 + 0.2 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.75], out[i][r < 0.4] = 1, 2, 3
    return out


def site_data(contrast, seed: int, n: int = N) -> TensorDataset:
    labels = ellipses(n, SIZE, seed)
    gen = torch.Generator().manual_seed(seed)
    images = (torch.tensor(contrast)[labels] + 0.03 * torch.randn(labels.shape, generator=gen)).clamp(-1, 1)
    return TensorDataset(images[:, None], labels)


def setup(options=None, noise=1.0, clip=1.0):
    config = RunConfig(recipe="spcycle-gan", image_size=SIZE, batch_size=BATCH, sites="A,B", seed=0,
                       options={**SMALL, **(options or {})})
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(N, BATCH),
                       total_steps=100, noise_multiplier=noise, max_grad_norm=clip)
    return build_recipe(config), PublicData(ellipses(8, SIZE, seed=99)), plan


def train(recipe, model, data, public, private, site=0, steps=2, state=None, seed=0):
    ctx = RoundContext(data, public, private, site, steps, {} if state is None else state, "cpu", seed)
    return recipe.train_local(model, ctx)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_registry_options_capability_and_what_travels():
    recipe, _, _ = setup()
    assert isinstance(recipe, SPCycleGAN) and recipe.private_modules == ("cycle",)
    assert declares(recipe, Translation) and not recipe.requires_labels
    model = recipe.build()
    shared = recipe.shared_keys(model)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in shared if k.startswith("cycle.")} == {"cycle.gen", "cycle.disc"}
    assert any(k.startswith("seg.") for k in shared) and recipe.one_off_releases() == ()
    assert not any(p.requires_grad for p in model.seg.parameters())  # S is frozen
    with pytest.raises(ConfigError, match="structure-weight"):
        build_recipe(RunConfig(recipe="spcycle-gan", options={"structure-weight": -1.0}))


def test_every_parameter_a_real_data_term_touches_is_inside_the_private_module(monkeypatch):
    """The one module given to DP-SGD holds every parameter that the real-data loss moves
    (G through the cycle, identity and structure terms, D through the adversarial ones);
    S, the only other network, gets no gradient and does not change."""
    recipe, public, plan = setup()
    wrapped = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        wrapped.append((module, dataset))
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model = recipe.build()
    seg_before = copy.deepcopy(model.seg.state_dict())
    data = site_data(T1, 1)
    train(recipe, model, data, public, PrivateTraining(plan, [], seed=0))
    assert len(wrapped) == 1 and wrapped[0][1] is data
    private_params = {id(p) for p in wrapped[0][0].parameters()}
    assert all(torch.equal(v, model.seg.state_dict()[k]) for k, v in seg_before.items())
    # every parameter the real-data objective reaches, on a plain (unwrapped) copy
    x, labels = data.tensors[0][:4], data.tensors[1][:4]
    source = torch.zeros(4, dtype=torch.long)
    recipe.objective.loss(model.cycle, recipe.disc_twin(model), model.seg, x, labels, source,
                          torch.ones(4, dtype=torch.long)).backward()
    touched = [(name, p) for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(name.startswith("cycle.gen.") for name, _ in touched)
    assert any(name.startswith("cycle.disc.") for name, _ in touched)
    outside = [name for name, p in touched if id(p) not in private_params]
    assert not outside, f"parameters moved by real data but not DP-trained: {outside}"


def test_private_update_follows_the_private_data_and_the_public_segmenter_does_not():
    """Noise and clipping effectively off: G's and D's update differ between two sites'
    data sets (same seeds), are bit-identical for the same one, and S is unchanged."""
    recipe, public, plan = setup(noise=1e-9, clip=1e9)
    start = recipe.build()

    def trained(data):
        model = copy.deepcopy(start)
        train(recipe, model, data, public, PrivateTraining(plan, [], seed=3), seed=5)
        return model

    a, a_again, b = trained(site_data(T1, 1)), trained(site_data(T1, 1)), trained(site_data(T2, 1))
    for part in ("gen", "disc"):
        sa, sb = getattr(a.cycle, part).state_dict(), getattr(b.cycle, part).state_dict()
        assert not all(torch.equal(sa[k], sb[k]) for k in sa), f"{part}'s update ignored the private data"
        again = getattr(a_again.cycle, part).state_dict()
        assert all(torch.equal(sa[k], again[k]) for k in sa)
    for model in (a, b):
        assert all(torch.equal(v, model.seg.state_dict()[k]) for k, v in start.seg.state_dict().items())


def test_structure_term_reaches_the_generator():
    """structure-weight 0 (the plain CycleGAN) and 1 give different generator gradients."""
    grads = []
    for weight in (0.0, 1.0):
        recipe, _, _ = setup({"structure-weight": weight})
        model = recipe.build()
        data = site_data(T1, 1)
        recipe.objective.loss(model.cycle, recipe.disc_twin(model), model.seg, data.tensors[0][:4],
                              data.tensors[1][:4], torch.zeros(4, dtype=torch.long),
                              torch.ones(4, dtype=torch.long)).backward()
        grads.append(model.cycle.gen.out.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_per_record_gradients_match_an_autograd_loop():
    """Opacus' per-record gradients of the whole objective (G used three times, D twice
    plus its detached twin, S in between) equal an autograd loop over records."""
    recipe, _, plan = setup()
    model = recipe.build()
    data = site_data(T1, 2)
    private = PrivateTraining(plan, [], seed=0)
    nets, dp_opt, _ = private.make_private(model.cycle, recipe.optimizer(model), data, BATCH)
    twin = recipe.disc_twin(model)
    x, labels = data.tensors[0][:5], data.tensors[1][:5]
    source, target = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)

    def one_record(module, xi, yi, si, ti):
        return recipe.objective.loss(module, twin, model.seg, xi, yi, si, ti)

    recipe.objective.loss(nets, twin, model.seg, x, labels, source, target).backward()
    got = [p.grad_sample for p in dp_opt.params]
    expected = per_sample_grads_reference(nets, one_record, x, labels, source, target)
    assert len(got) == len(expected) == len([p for p in model.cycle.parameters()])
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (g - e).abs().max()
    private.close()


def test_ledger_epsilon_equals_the_opacus_accountant_for_the_steps_taken(tmp_path):
    """Two rounds through the product's PrivacyRound: G and D share ONE accountant step per
    private step (4 entries, not 8), and the committed epsilon is Opacus' RDP for them."""
    recipe, public, _ = setup()
    q = sample_rate_for(N, BATCH)
    schedule = PrivacySchedule(target_epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=q,
                               total_steps=4, max_grad_norm=1.0, releases=recipe.one_off_releases())
    model, data, state = recipe.build(), site_data(T1, 1), {}
    for server_round in (1, 2):
        privacy = PrivacyRound.at(tmp_path / "ledger.json", "A", schedule, run_id="r", server_round=server_round,
                                  steps=2, cap_epsilon=8.0, seed=server_round)
        with privacy as private:
            train(recipe, model, data, public, private, state=state, seed=server_round)
    sigma = privacy.plan.noise_multiplier
    assert privacy.ledger.steps == 4
    oracle = RDPAccountant()
    for _ in range(4):
        oracle.step(noise_multiplier=sigma, sample_rate=q)
    assert privacy.epsilon == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy.epsilon <= 8.0 + 1e-6 and state["rounds_trained"] == 2


def test_translation_sampling_and_the_central_ceiling_step():
    recipe, public, _ = setup()
    model = recipe.build()
    data = site_data(T1, 1)
    with torch.no_grad():  # a non-trivial site code, so the target matters
        for film in model.cycle.gen.films:
            film.shift.weight.normal_()
    x = data.tensors[0][:3]
    styles = [recipe.site_style(model, public, k) for k in range(2)]
    to_a, to_b = (recipe.translate_images(model, x, styles[0], s) for s in styles)
    assert to_a.shape == (3, 1, SIZE, SIZE) and to_a.abs().max() <= 1 and not torch.allclose(to_a, to_b)
    samples = recipe.sample(model, public.label_maps[:2], 1, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, SIZE, SIZE) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="out of range"):
        recipe.site_style(model, public, 2)
    # the ceiling: the same objective on a pooled two-site batch, no DP-SGD
    before = copy.deepcopy(model.cycle.state_dict())
    pooled = torch.cat([x, site_data(T2, 2).tensors[0][:3]])
    labels = torch.cat([data.tensors[1][:3], site_data(T2, 2).tensors[1][:3]])
    loss = recipe.objective.central_step(model.cycle, recipe.optimizer(model), recipe.disc_twin(model), model.seg,
                                         pooled, labels, torch.tensor([0, 0, 0, 1, 1, 1]),
                                         torch.Generator().manual_seed(0))
    assert np.isfinite(loss) and not all(torch.equal(v, model.cycle.state_dict()[k]) for k, v in before.items())


# -- through Flower, then `medgen translate` with the trained checkpoint -----------------------
@pytest.fixture(scope="module")
def flower_run(tmp_path_factory, tiny_federation) -> Path:
    """`medgen-server simulate`: 2 rounds x 2 steps, 2 sites, 32 px, tiny networks."""
    out = tmp_path_factory.mktemp("spcycle") / "run"
    settings = ["recipe=spcycle-gan", "num-rounds=2", "local-steps=2", "image-size=32", "batch-size=4",
                "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "simulate-actors=1", "options.gen-width=4",
                "options.gen-blocks=1", "options.disc-width=4", "options.seg-pretrain-steps=2",
                "options.public-eval-samples=2"]
    cli = Path(sys.executable).parent / "medgen-server"
    done = subprocess.run([str(cli), "simulate", "--data-root", str(tiny_federation), "--out", str(out),
                           "--timeout", "600", *[a for s in settings for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_round_flower_simulation_spends_within_the_budget(flower_run):
    import json

    from medgen.server.run_log import read_metrics

    checkpoint = load_checkpoint(flower_run)
    assert checkpoint is not None and checkpoint.server_round == 2
    assert any(k.startswith("cycle.gen.") for k in checkpoint.shared_state)
    train_records = [r for r in read_metrics(flower_run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train_records] == [1, 2]
    privacy = json.loads((flower_run / "privacy.json").read_text())
    for site in ("A", "B"):
        eps = [r["per_site"][site]["epsilon"] for r in train_records]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
        assert privacy["node_ledgers"][site]["steps"] == 4  # G and D: one accountant step per step


@pytest.mark.slow
def test_translate_real_nifti_files_with_the_trained_checkpoint(flower_run, tiny_federation, tmp_path):
    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    volume = rng.uniform(100, 900, (24, 20, 2))
    write_physical_nifti(site / "images" / "p1.nii.gz", volume, (1.0, 1.2, 3.0), "arbitrary")
    (site / "dataset.toml").write_text('[dataset]\nmodality = "MR"\n\n[intensity]\nunits = "arbitrary"\n'
                                       'normalisation = "percentile"\npercentiles = [0.5, 99.5]\n\n'
                                       '[labels]\nnone = true\n')
    translator = Translator(flower_run, tiny_federation / "public", "A", "B")
    assert translator.target_style == 1
    out = tmp_path / "out"
    written = translate_site(site, out, translator, translator.size, "B")
    assert written == [out / "images" / "p1.nii.gz"]
    back, spacing = read_physical_nifti(written[0])
    assert back.shape == volume.shape and np.isfinite(back).all() and spacing == pytest.approx((1.0, 1.2, 3.0))
    assert not np.allclose(back, volume)  # it translated
    assert nib.load(str(written[0])).get_data_dtype() == np.float32
