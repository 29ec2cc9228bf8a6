"""da-gan: the DP argument (which updates depend on which data), the accounting, a paired-site
refusal, and a 2-round Flower simulation on a paired head-ct federation.

Synthetic pairs for the unit tests: ellipse label maps; the CT = a fixed value per tissue
class + noise; the MR = another contrast of the same map shifted by a few pixels (a
misaligned pair). 16 px, 4-channel networks, few steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.atomic import atomic_write_text
from medgen.client.translate import main as translate_main
from medgen.config import ConfigError, RunConfig
from medgen.data.manifest import DatasetManifest, IntensityPolicy, PairedModality, load_manifest
from medgen.data.patient_dataset import PatientDataset
from medgen.data.site_data import load_site
from medgen.models.capabilities import (SiteDataRefused, TranslatedOutput, Translation, declares,
                                       translation_output)
from medgen.models.da_gan import DAGan
from medgen.models.recipe import RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan
from medgen.privacy.round import PrivacyRound, PrivacySchedule
from medgen.server.checkpoint import load_checkpoint, new_checkpoint, save_checkpoint
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

CT = (-1.0, -0.6, 0.1, 0.4)   # background and three tissues
MR = (-1.0, 0.8, 0.1, -0.5)
SMALL = {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "reg-width": 4, "integration-steps": 3}
SIZE, N, BATCH = 16, 12, 4


def ellipses(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    out = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.6 + 0.2 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.6], out[i][r < 0.3] = 1, 2, 3
    return out


def paired_data(seed: int, n: int = N, ct=CT) -> TensorDataset:
    labels = ellipses(n, seed)
    gen = torch.Generator().manual_seed(seed)
    noise = lambda: 0.03 * torch.randn(labels.shape, generator=gen)  # noqa: E731
    ct_images = (torch.tensor(ct)[labels] + noise()).clamp(-1, 1)
    mr_images = (torch.tensor(MR)[torch.roll(labels, shifts=(1, 2), dims=(1, 2))] + noise()).clamp(-1, 1)
    return TensorDataset(ct_images[:, None], labels, mr_images[:, None])


def setup(options=None, noise=1.0, clip=1.0):
    config = RunConfig(recipe="da-gan", image_size=SIZE, batch_size=BATCH, sites="A,B", seed=0,
                       options={**SMALL, **(options or {})})
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(N, BATCH),
                       total_steps=100, noise_multiplier=noise, max_grad_norm=clip)
    return build_recipe(config), plan


def train(recipe, model, data, private, site=0, steps=2, state=None, seed=0):
    ctx = RoundContext(data, None, private, site, steps, {} if state is None else state, "cpu", seed)
    return recipe.train_local(model, ctx)


def batch_of(data: TensorDataset, n: int = 4):
    ct, _, mr = data.tensors
    return mr[:n], ct[:n], torch.zeros(n, dtype=torch.long)


def moving_registration(model) -> None:
    """R's output layer is zero at init (identity); give it weights so gradients reach R."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.nets.reg.output_block.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_registry_options_and_what_travels():
    recipe, _ = setup()
    assert isinstance(recipe, DAGan) and recipe.private_modules == ("nets",) and not recipe.requires_labels
    model = recipe.build()
    assert {k.split(".")[1] for k in recipe.shared_keys(model)} == {"gen", "reg", "disc"}
    assert set(recipe.shared_keys(model)) == set(model.state_dict())  # every network is a DP release
    # MR->CT: the Translation capability, with its output declared as data (CT in HU through
    # the CT window), so `medgen translate` writes HU (tests/client/test_translate_recipes.py)
    assert declares(recipe, Translation)
    assert translation_output(recipe, 1) == TranslatedOutput(modality="CT", units="HU",
                                                              window=(-1000.0, 2000.0), reads="MR")
    assert recipe.site_style(model, None, 1) == 1
    with pytest.raises(ConfigError, match="ct-window-lo"):
        build_recipe(RunConfig(recipe="da-gan", options={"ct-window-lo": 3000.0}))
    with pytest.raises(ConfigError, match="l1-weight"):
        build_recipe(RunConfig(recipe="da-gan", options={"l1-weight": -1.0}))


def test_refuses_a_site_without_paired_mr_before_any_budget(tmp_path):
    """check_site (plan time): a CT site without [paired] is refused, naming what to add."""
    recipe, _ = setup()
    unpaired = TensorDataset(torch.zeros(2, 1, SIZE, SIZE), torch.zeros(2, SIZE, SIZE, dtype=torch.long))
    unpaired.manifest = DatasetManifest.default_brain()
    with pytest.raises(SiteDataRefused, match=r"\[paired\] modality = \"MR\""):
        recipe.check_site(unpaired)
    ok = paired_data(1)
    ok.paired, ok.manifest = ok.tensors[2], DatasetManifest(
        modality="CT", intensity=IntensityPolicy(units="HU", normalisation="window", window=(-1000.0, 2000.0)),
        labels=None, paired=PairedModality("MR"))
    recipe.check_site(ok)
    # G's [-1, 1] is the run's CT window, which translations are written in: a site that
    # trains on another window would make those HU wrong, so it is refused
    ok.manifest = dataclasses.replace(ok.manifest, intensity=IntensityPolicy(
        units="HU", normalisation="window", window=(-1024.0, 3071.0)))
    with pytest.raises(SiteDataRefused, match="ct-window-lo/hi"):
        recipe.check_site(ok)


def test_every_parameter_a_real_data_term_touches_is_inside_the_private_module(monkeypatch):
    """The one module given to DP-SGD is ``nets`` and holds every parameter the real-data
    loss moves: G, R and D each get a gradient from a real batch. (Mutation: keep R on the
    recipe instead of in ``nets`` -> its parameters move but are not in the wrapped module.)"""
    recipe, plan = setup()
    wrapped = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        wrapped.append((module, dataset))
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model, data = recipe.build(), paired_data(1)
    train(recipe, model, data, PrivateTraining(plan, [], seed=0))
    assert len(wrapped) == 1 and wrapped[0][1] is data
    private_params = {id(p) for p in wrapped[0][0].parameters()}
    model.zero_grad(set_to_none=True)
    moving_registration(model)
    recipe.objective.loss(model.nets, recipe.disc_twin(model), *batch_of(data)).backward()
    touched = [(name, p) for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    for part in ("gen", "reg", "disc"):
        assert any(name.startswith(f"nets.{part}.") for name, _ in touched), f"{part} got no gradient"
    outside = [name for name, p in touched if id(p) not in private_params]
    assert not outside, f"parameters moved by real data but not DP-trained: {outside}"


def test_discriminator_receives_only_its_own_terms():
    """D's gradient is the same with the adversarial (G/R) term on or off: that term reads D
    through the detached twin. G's gradient does change. (Mutation, tried: evaluate the term
    with ``nets.disc`` instead of the twin -> D's gradients differ and this fails.)"""
    grads = {}
    for weight in (0.0, 1.0):
        recipe, _ = setup({"adversarial-weight": weight})
        model = recipe.build()
        moving_registration(model)
        recipe.objective.loss(model.nets, recipe.disc_twin(model), *batch_of(paired_data(2))).backward()
        grads[weight] = ([p.grad.clone() for p in model.nets.disc.parameters()],
                         model.nets.gen.out.weight.grad.clone())
    assert all(torch.equal(a, b) for a, b in zip(grads[0.0][0], grads[1.0][0]))
    assert not torch.allclose(grads[0.0][1], grads[1.0][1])


def test_a_patients_update_depends_on_that_patient_alone():
    """Opacus' per-record gradients of the whole objective (G once, R twice, D twice plus its
    twin, LocalNet's transposed convolutions) equal an autograd loop over records, so the
    clipped contribution of one patient is a function of that patient's CT and MR only:
    for two data sets that share record 0, record 0's gradient is identical.
    (Mutation, tried: D's condition warped from another record's MR, ``mr.roll(1, 0)``,
    fails here; so would any batch-coupled term such as BatchNorm in R.)"""
    recipe, plan = setup()
    model = recipe.build()
    moving_registration(model)
    data, other = paired_data(3), paired_data(4)
    private = PrivateTraining(plan, [], seed=0)
    nets, dp_opt, _ = private.make_private(model.nets, recipe.optimizer(model), data, BATCH)
    twin = recipe.disc_twin(model)
    mr, ct, site = batch_of(data, 3)
    recipe.objective.loss(nets, twin, mr, ct, site).backward()
    got = [p.grad_sample.clone() for p in dp_opt.params]
    expected = per_sample_grads_reference(nets, lambda m, x, y, s: recipe.objective.loss(m, twin, x, y, s), mr, ct, site)
    assert len(got) == len(expected) == len(list(model.nets.parameters()))
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), (g - e).abs().max()
    dp_opt.zero_grad(set_to_none=True)
    mr2, ct2, _ = batch_of(other, 3)
    mixed_mr, mixed_ct = torch.cat([mr[:1], mr2[1:]]), torch.cat([ct[:1], ct2[1:]])
    recipe.objective.loss(nets, twin, mixed_mr, mixed_ct, site).backward()
    for g, p in zip(got, dp_opt.params):
        assert torch.allclose(g[0], p.grad_sample[0], atol=1e-6)
    private.close()


def test_private_update_follows_the_private_data():
    """Noise and clipping effectively off: G's, R's and D's updates differ between two data
    sets (same seeds) and are bit-identical for the same one."""
    recipe, plan = setup(noise=1e-9, clip=1e9)
    start = recipe.build()
    moving_registration(start)

    def trained(data):
        model = copy.deepcopy(start)
        train(recipe, model, data, PrivateTraining(plan, [], seed=3), seed=5)
        return model

    a, a_again, b = trained(paired_data(1)), trained(paired_data(1)), trained(paired_data(1, ct=(-1.0, 0.5, -0.2, 0.9)))
    for part in ("gen", "reg", "disc"):
        sa, sb = getattr(a.nets, part).state_dict(), getattr(b.nets, part).state_dict()
        assert not all(torch.equal(sa[k], sb[k]) for k in sa), f"{part}'s update ignored the private data"
        again = getattr(a_again.nets, part).state_dict()
        assert all(torch.equal(sa[k], again[k]) for k in sa)


def test_ledger_epsilon_equals_the_opacus_accountant_for_the_steps_taken(tmp_path):
    """Two rounds through the product's PrivacyRound: G, R and D share ONE accountant step per
    private step (4 entries, not 12), and the committed epsilon is Opacus' RDP for them."""
    recipe, _ = setup()
    q = sample_rate_for(N, BATCH)
    schedule = PrivacySchedule(target_epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=q,
                               total_steps=4, max_grad_norm=1.0, releases=recipe.one_off_releases())
    model, data, state = recipe.build(), paired_data(1), {}
    for server_round in (1, 2):
        privacy = PrivacyRound.at(tmp_path / "ledger.json", "A", schedule, run_id="r", server_round=server_round,
                                  steps=2, cap_epsilon=8.0, seed=server_round)
        with privacy as private:
            train(recipe, model, data, private, state=state, seed=server_round)
    sigma = privacy.plan.noise_multiplier
    assert privacy.ledger.steps == 4
    oracle = RDPAccountant()
    for _ in range(4):
        oracle.step(noise_multiplier=sigma, sample_rate=q)
    assert privacy.epsilon == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy.epsilon <= 8.0 + 1e-6 and state["rounds_trained"] == 2


def test_synthesize_and_sample_are_post_processing():
    recipe, _ = setup()
    model = recipe.build()
    mr = paired_data(1).tensors[2][:3]
    fake = recipe.synthesize(model, mr, 1)
    assert fake.shape == (3, 1, SIZE, SIZE) and fake.abs().max() <= 1
    samples = recipe.sample(model, ellipses(2, 9), 0, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, SIZE, SIZE) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="out of range"):
        recipe.synthesize(model, mr, 2)


# -- through Flower, on a paired head-ct federation ----------------------------------------------
@pytest.mark.slow
def test_two_round_flower_simulation_on_paired_sites(tmp_path):
    """`medgen-server simulate` on a head-ct federation whose sites A and B hold misaligned
    MR/CT pairs: the node loads the pairs through the manifest, 2 rounds x 1 step, 32 px,
    one accountant step per private step at each site, within the budget."""
    torch.set_num_threads(1)
    root = tmp_path / "data"
    build_head_federation(HeadSimConfig(sites="A,B", paired_sites="A,B", subjects_per_site=6, public_size=2,
                                        heldout_fit=0, heldout_test=1, image_size=32), root)
    assert load_site(root / "sites" / "A", 32).paired.shape == (6, 1, 32, 32)
    out = tmp_path / "run"
    settings = ["recipe=da-gan", "num-rounds=2", "local-steps=1", "image-size=32", "batch-size=3",
                "accountant=rdp", "target-epsilon=8.0", "eval-every=0", "options.gen-width=4",
                "options.gen-blocks=1", "options.disc-width=4", "options.reg-width=4",
                "options.integration-steps=3"]
    cli = Path(sys.executable).parent / "medgen-server"
    done = subprocess.run([str(cli), "simulate", "--data-root", str(root), "--out", str(out),
                           "--timeout", "600", *[a for s in settings for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None and checkpoint.server_round == 2
    assert any(k.startswith("nets.reg.") for k in checkpoint.shared_state)
    privacy = json.loads((out / "privacy.json").read_text())
    for site in ("A", "B"):
        assert privacy["node_ledgers"][site]["steps"] == 2
        assert 0 < privacy["node_ledgers"][site]["epsilon"] <= 8.0 + 1e-6


# -- `medgen translate` with a trained checkpoint, on the simulator's held-out MR files ------------
@pytest.mark.slow
def test_translate_held_out_mr_files_to_hu_with_a_trained_run(tmp_path, capsys):
    """20 steps of the recipe's own train_local at a paired head-ct site (noise and clipping
    effectively off: a model that has learnt the contrast, the DP path is tested above),
    saved as a run dir; `medgen translate` on the held-out MR NIfTIs the simulator wrote
    (an MR site folder, as a hospital holds it). The output reads back as CT in HU: the air
    around the head near -1000 HU, the head far above it, the error against the true CT of
    the same anatomy in the MR's pose (paired-clean) well below the MR's own values read as
    HU (mutation, tried: writing through the input's MR map fails the air and error checks);
    the geometry is the input's; the input is unchanged."""
    root = tmp_path / "data"
    build_head_federation(HeadSimConfig(sites="A", paired_sites="A", subjects_per_site=6, public_size=2,
                                        heldout_fit=0, heldout_test=3, image_size=32), root)
    config = RunConfig(recipe="da-gan", image_size=32, batch_size=6, sites="A,B", seed=0,
                       options={**SMALL, "lr-gen": 5e-3, "adversarial-weight": 0.0})
    recipe = build_recipe(config)
    plan = PrivacyPlan(target_epsilon=1e8, delta=1e-5, accountant="rdp", sample_rate=1.0, total_steps=20,
                       noise_multiplier=1e-6, max_grad_norm=1e6)
    model, site = recipe.build(), load_site(root / "sites" / "A", 32)
    train(recipe, model, PatientDataset(site, generator_seed=0), PrivateTraining(plan, [], seed=0), steps=20)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(model), 1, config, "test"))

    heldout = root / "heldout" / "test" / "A"
    mr_site = tmp_path / "mr-site"
    (mr_site / "images").mkdir(parents=True)
    for path in sorted((heldout / "paired").glob("*.nii.gz")):
        shutil.copyfile(path, mr_site / "images" / path.name)
    load_manifest(heldout).paired.manifest(load_manifest(heldout)).write(mr_site)  # MR, percentiles
    before = {p.name: p.read_bytes() for p in (mr_site / "images").iterdir()}
    out = tmp_path / "out"
    assert translate_main(["--run-dir", str(run_dir), "--public", str(root / "public"), "--source-site", "A",
                           "--target-site", "A", "--out", str(out), str(mr_site)]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (mr_site / "images").iterdir()} == before
    assert load_manifest(out).modality == "CT"
    hu, truth, mr, labels = [], [], [], []
    for path in sorted((mr_site / "images").iterdir()):
        written, source = nib.load(str(out / "images" / path.name)), nib.load(str(path))
        assert written.get_data_dtype() == np.int16 and written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
        hu.append(written.get_fdata())
        mr.append(source.get_fdata())
        truth.append(nib.load(str(heldout / "paired-clean" / path.name)).get_fdata())
        labels.append(nib.load(str(heldout / "paired-labels" / path.name)).get_fdata())
    hu, truth, mr, labels = (np.stack(a) for a in (hu, truth, mr, labels))
    air, head = labels == 0, labels > 0
    assert hu[air].mean() < -500 and hu[head].mean() > hu[air].mean() + 300
    error = np.abs(hu - truth)[head].mean()
    assert error < 0.5 * np.abs(mr - truth)[head].mean() and error < 400
