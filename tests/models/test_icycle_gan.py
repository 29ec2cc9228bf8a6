"""icycle-gan: the DP argument (which updates depend on which data), the accounting, a
2-round Flower simulation and `medgen translate` on a real NIfTI file with its checkpoint.

Synthetic anatomy: ellipse label maps; a site's image = a fixed intensity per tissue
class + noise (16 px, 4-channel networks, few steps).
"""

from __future__ import annotations

import copy
import json

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
from medgen.models.icycle_gan import CorrectionNet, ICycleGAN
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan
from medgen.privacy.round import PrivacyRound, PrivacySchedule
from medgen.server.checkpoint import load_checkpoint
from medgen.server.run_log import read_metrics

T1 = (-1.0, -0.5, 0.1, 0.8)  # background and three tissues
T2 = (-1.0, 0.8, 0.1, -0.5)
SMALL = {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "corr-width": 4}
SIZE, N, BATCH = 16, 16, 4


def ellipses(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    out = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.7 + 0.2 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.75], out[i][r < 0.4] = 1, 2, 3
    return out


def site_data(contrast, seed: int) -> TensorDataset:
    labels = ellipses(N, seed)
    gen = torch.Generator().manual_seed(seed)
    images = (torch.tensor(contrast)[labels] + 0.03 * torch.randn(labels.shape, generator=gen)).clamp(-1, 1)
    return TensorDataset(images[:, None], labels)


def setup(options=None, noise=1.0, clip=1.0):
    config = RunConfig(recipe="icycle-gan", image_size=SIZE, batch_size=BATCH, sites="A,B", seed=0,
                       options={**SMALL, **(options or {})})
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(N, BATCH),
                       total_steps=100, noise_multiplier=noise, max_grad_norm=clip)
    return build_recipe(config), PublicData(ellipses(8, seed=99)), plan


def train(recipe, model, data, public, private, steps=2, state=None, seed=0):
    ctx = RoundContext(data, public, private, 0, steps, {} if state is None else state, "cpu", seed)
    return recipe.train_local(model, ctx)


def perturb_corrector(model) -> None:
    """R away from its zero-initialised identity, so it shows in gradients and translations."""
    with torch.no_grad():
        torch.manual_seed(7)
        model.cycle.corr.out.weight.normal_(0, 0.3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_registry_options_capability_and_what_travels():
    recipe, _, _ = setup()
    assert isinstance(recipe, ICycleGAN) and recipe.private_modules == ("cycle",)
    assert declares(recipe, Translation) and not recipe.requires_labels and recipe.one_off_releases() == ()
    model = recipe.build()
    assert {k.split(".")[1] for k in recipe.shared_keys(model)} == {"gen", "disc", "corr"}
    assert set(recipe.shared_keys(model)) == set(model.state_dict())  # all of it travels, all of it is private
    with pytest.raises(ConfigError, match="noisy-label-weight"):
        build_recipe(RunConfig(recipe="icycle-gan", options={"noisy-label-weight": -1.0}))


def test_every_parameter_a_real_data_term_moves_is_inside_the_private_module(monkeypatch):
    """The one module handed to DP-SGD holds every parameter the real-data objective moves:
    G, D and the correction network R. Mutation checked: building R as ``model.corr``
    (outside ``cycle``, translate reading it there) makes this test fail with R's names."""
    recipe, public, plan = setup()
    wrapped = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        wrapped.append((module, dataset))
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model = recipe.build()
    perturb_corrector(model)
    data = site_data(T1, 1)
    train(recipe, model, data, public, PrivateTraining(plan, [], seed=0))
    assert len(wrapped) == 1 and wrapped[0][1] is data
    private_params = {id(p) for p in wrapped[0][0].parameters()}
    model.zero_grad(set_to_none=True)
    recipe.objective.loss(model.cycle, recipe.disc_twin(model), None, data.tensors[0][:4], None,
                          torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)).backward()
    touched = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    corrector = {name for m_name, m in model.named_modules() if isinstance(m, CorrectionNet)
                 for name in (f"{m_name}.{p_name}" for p_name, _ in m.named_parameters())}
    assert set(touched) & corrector, "no real-data term reaches the correction network"
    for part in ("gen", "disc"):
        assert any(name.startswith(f"cycle.{part}.") for name in touched), f"no real-data term reaches {part}"
    outside = [name for name, p in model.named_parameters() if name in touched and id(p) not in private_params]
    assert not outside, f"parameters moved by real data but not DP-trained: {outside}"


def test_noisy_label_term_moves_the_corrector_only():
    """The noisy label G(x, j) is detached: with the prediction's G path cut, the term's
    gradient reaches R alone (never D, and never G through the label). Mutation checked:
    computing the label with gradient gives G a gradient there and fails."""
    recipe, _, _ = setup()
    model = recipe.build()
    perturb_corrector(model)
    x, source, target = site_data(T1, 1).tensors[0][:4], torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    fake = recipe.objective.translate(model.cycle, x, target)
    recipe.objective.extra_terms(model.cycle, None, x, None, fake, source, target).backward()
    moved = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"corr", "gen"}  # through the translation T = R o G, as every term of T
    model.zero_grad(set_to_none=True)
    fake_without_g = model.cycle.corr(model.cycle.gen(x, target).detach(), target)
    recipe.objective.extra_terms(model.cycle, None, x, None, fake_without_g, source, target).backward()
    moved = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"corr"}  # the label side moves nothing
    off, _, _ = setup({"noisy-label-weight": 0.0})
    assert off.objective.extra_terms(model.cycle, None, x, None, fake, source, target) == 0.0


def test_the_corrector_is_the_identity_at_init_and_in_the_translation_path():
    recipe, public, _ = setup()
    model = recipe.build()
    x, target = site_data(T1, 1).tensors[0][:3], torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        raw = model.cycle.gen(x, target)
        assert torch.allclose(recipe.translate_images(model, x, 0, 1), raw, atol=1e-5)
        perturb_corrector(model)
        corrected = recipe.translate_images(model, x, 0, 1)
    assert corrected.shape == (3, 1, SIZE, SIZE) and corrected.abs().max() <= 1
    assert not torch.allclose(corrected, raw, atol=1e-3)  # R is applied after G
    samples = recipe.sample(model, public.label_maps[:2], 1, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, SIZE, SIZE) and torch.isfinite(samples).all()


def test_what_must_not_depend_on_the_private_data_does_not():
    """Noise and clipping effectively off, same seeds: the target-site draws (public
    randomness) and the returned metrics (but wall time) are identical for two sites' data
    sets, while G's, R's and D's updates differ (and are bit-identical for the same data)."""
    recipe, public, plan = setup(noise=1e-9, clip=1e9)
    start = recipe.build()
    perturb_corrector(start)
    draws = []
    original = recipe.objective.targets

    def recorded(source, rng):
        draws[-1].append(original(source, rng))
        return draws[-1][-1]

    recipe.objective.targets = recorded

    def trained(data):
        draws.append([])
        model = copy.deepcopy(start)
        metrics = train(recipe, model, data, public, PrivateTraining(plan, [], seed=3), seed=5)
        return model, {k: v for k, v in metrics.items() if k != "seconds"}

    (a, ma), (a_again, _), (b, mb) = trained(site_data(T1, 1)), trained(site_data(T1, 1)), trained(site_data(T2, 1))
    assert ma == mb and len(draws[0]) == len(draws[2]) > 0
    assert all(torch.equal(u, v) for u, v in zip(draws[0], draws[2]))
    for part in ("gen", "disc", "corr"):
        sa, sb, again = (getattr(m.cycle, part).state_dict() for m in (a, b, a_again))
        assert not all(torch.equal(sa[k], sb[k]) for k in sa), f"{part}'s update ignored the private data"
        assert all(torch.equal(sa[k], again[k]) for k in sa)


def test_per_record_gradients_match_an_autograd_loop():
    """Opacus' per-record gradients of the whole objective (G, R, D, the detached twin and
    the no-grad noisy label) equal an autograd loop over records."""
    recipe, _, plan = setup()
    model = recipe.build()
    perturb_corrector(model)
    data = site_data(T1, 2)
    private = PrivateTraining(plan, [], seed=0)
    nets, dp_opt, _ = private.make_private(model.cycle, recipe.optimizer(model), data, BATCH)
    twin = recipe.disc_twin(model)
    x, source, target = data.tensors[0][:5], torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)

    def one_record(module, xi, si, ti):
        return recipe.objective.loss(module, twin, None, xi, None, si, ti)

    one_record(nets, x, source, target).backward()
    got = {id(p): p.grad_sample for p in dp_opt.params}  # the optimizer's order is (G, R), D
    expected = per_sample_grads_reference(nets, one_record, x, source, target)  # module order
    assert len(got) == len(expected) == len(list(model.cycle.parameters()))
    for g, e in zip((got[id(p)] for p in model.cycle.parameters()), expected):  # float32 through atanh: tolerance relative to the largest entry
        assert torch.allclose(g, e, atol=1e-5 * max(1.0, float(e.abs().max())), rtol=1e-4), (g - e).abs().max()
    private.close()


def test_ledger_epsilon_equals_the_opacus_accountant_for_the_steps_taken(tmp_path):
    """Two rounds through PrivacyRound: G, R and D share ONE accountant step per private
    step (4 entries), and the committed epsilon is Opacus' RDP for them."""
    recipe, public, _ = setup()
    q = sample_rate_for(N, BATCH)
    schedule = PrivacySchedule(target_epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=q, total_steps=4,
                               max_grad_norm=1.0, releases=recipe.one_off_releases())
    model, data, state = recipe.build(), site_data(T1, 1), {}
    for server_round in (1, 2):
        privacy = PrivacyRound.at(tmp_path / "ledger.json", "A", schedule, run_id="r", server_round=server_round,
                                  steps=2, cap_epsilon=8.0, seed=server_round)
        with privacy as private:
            train(recipe, model, data, public, private, state=state, seed=server_round)
    oracle = RDPAccountant()
    for _ in range(4):
        oracle.step(noise_multiplier=privacy.plan.noise_multiplier, sample_rate=q)
    assert privacy.ledger.steps == 4 and state["rounds_trained"] == 2
    assert privacy.epsilon == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-9) and privacy.epsilon <= 8.0 + 1e-6


# -- through Flower, then `medgen translate` with the trained checkpoint -----------------------
@pytest.mark.slow
def test_two_round_flower_simulation_then_translate_a_real_nifti(simulate, tiny_federation, tmp_path):
    """`medgen-server simulate`: 2 sites, 2 rounds x 1 step, 32 px, tiny networks; then
    `medgen translate` (client/translate.py) of a real NIfTI MR volume with the checkpoint."""
    run = tmp_path / "run"
    records = simulate(tiny_federation, run, ["recipe=icycle-gan", "num-rounds=2", "local-steps=1", "image-size=32",
                                              "batch-size=4", "accountant=rdp", "target-epsilon=8.0", "eval-every=0",
                                              "options.gen-width=4", "options.gen-blocks=1", "options.disc-width=4",
                                              "options.corr-width=4"], timeout=600)
    checkpoint = load_checkpoint(run)
    assert checkpoint is not None and checkpoint.server_round == 2
    assert any(k.startswith("cycle.corr.") for k in checkpoint.shared_state)
    assert [r["round"] for r in records] == [1, 2] == [r["round"] for r in read_metrics(run / "metrics.jsonl")
                                                        if r["kind"] == "train"]
    privacy = json.loads((run / "privacy.json").read_text())
    for site in ("A", "B"):
        eps = [r["per_site"][site]["epsilon"] for r in records]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6 and privacy["node_ledgers"][site]["steps"] == 2
    site = tmp_path / "site"
    volume = np.random.default_rng(0).uniform(100, 900, (24, 20, 2))
    write_physical_nifti(site / "images" / "p1.nii.gz", volume, (1.0, 1.2, 3.0), "arbitrary")
    (site / "dataset.toml").write_text('[dataset]\nmodality = "MR"\n\n[intensity]\nunits = "arbitrary"\n'
                                       'normalisation = "percentile"\npercentiles = [0.5, 99.5]\n\n'
                                       '[labels]\nnone = true\n')
    translator = Translator(run, tiny_federation / "public", "A", "B")
    written = translate_site(site, tmp_path / "out", translator, translator.size, "B")
    assert written == [tmp_path / "out" / "images" / "p1.nii.gz"]
    back, spacing = read_physical_nifti(written[0])
    assert back.shape == volume.shape and np.isfinite(back).all() and spacing == pytest.approx((1.0, 1.2, 3.0))
    assert not np.allclose(back, volume) and nib.load(str(written[0])).get_data_dtype() == np.float32
