"""site-gan's adaptive schedule (Adaptive MedGAN): the privacy argument of
models/adaptive_schedule.py, the schedule itself, and 2 rounds through Flower.

Mutations each test was run against (and failed, as it should):
- the schedule reads the real term from ``ctx.data`` instead of the stored release
  -> test_schedule_is_identical_for_two_data_sets_given_the_same_release;
- the clamp of the per-patient critic means removed -> test_release_rows_are_bounded;
- the ratio ignored by gan_round -> test_generator_steps_follow_the_released_estimate;
- the release not accounted (or not declared in the plan) -> test_ledger_epsilon_...;
- D's forward in the release with gradients / D stepped -> test_only_the_critic_...
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from medgen.config import ConfigError, RunConfig
from medgen.models.adaptive_schedule import COUNTS_KEY, REAL_MEAN_KEY
from medgen.models.recipe import RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.ledger import PrivacyPlan
from medgen.privacy.round import PrivacyRound, PrivacySchedule

SIZE, N, BATCH, SIGMA_W = 16, 12, 4, 8.0


def setup(**options):
    config = RunConfig(recipe="site-gan", image_size=SIZE, batch_size=BATCH, sites="A,B", seed=0, num_rounds=2,
                       options={"gen-width": 4, "disc-width": 4, "noise-dim": 8, "schedule": "adaptive",
                                "wd-noise": SIGMA_W, **options})
    recipe = build_recipe(config)
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(N, BATCH),
                       total_steps=100, noise_multiplier=1.0, max_grad_norm=1.0,
                       releases=recipe.one_off_releases())
    return recipe, plan


def site_data(level: float, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = (level + 0.2 * torch.randn(N, 1, SIZE, SIZE, generator=gen)).clamp(-1, 1)
    return TensorDataset(images, torch.zeros(N, SIZE, SIZE, dtype=torch.long))


def context(data, private, state=None, steps=2, seed=0):
    return RoundContext(data, None, private, 0, steps, {} if state is None else state, "cpu", seed)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_options_declare_one_release_per_round_and_refuse_nonsense():
    recipe, _ = setup()
    assert recipe.one_off_releases() == ((SIGMA_W, 1.0, 2),)
    rule = recipe.adaptive()
    assert rule.ratio(0.0) == 0.5 and rule.ratio(0.25) > 0.5 > rule.ratio(-0.25)  # W = 0: the fixed schedule
    fixed = build_recipe(recipe.config.replace(options={"schedule": "fixed"}))
    assert fixed.one_off_releases() == ()  # the default plan is untouched
    with pytest.raises(ConfigError, match="min-gen-per-disc"):
        setup(**{"min-gen-per-disc": 5.0})


def test_schedule_is_identical_for_two_data_sets_given_the_same_release():
    """Step 6: the ratio reads the stored release and generated images only; the release
    itself (steps 1-4) does read the data."""
    recipe, plan = setup(**{"wd-scale": 10.0, "min-gen-per-disc": 0.01})  # W in [1, 5]: never clamped
    model = recipe.build()
    ratios, reals = [], []
    for level in (-0.8, 0.8):
        data = site_data(level, seed=1)
        ratios.append(recipe.adaptive().plan_round(recipe, model, context(data, None, {REAL_MEAN_KEY: 3.0})))
        private = PrivateTraining(plan, [], seed=0)
        reals.append(recipe.adaptive().release(recipe, model, context(data, private, {}))["wd_real_mean"])
    assert ratios[0] == ratios[1] and 0.5 < ratios[0] < 1.0
    assert reals[0] != reals[1]


def test_release_rows_are_bounded():
    """Step 1: every patient's row has L2 norm <= 1 whatever D outputs (sensitivity C = 1)."""
    recipe, _ = setup()
    model = recipe.build()
    with torch.no_grad():
        for p in model.disc.head.parameters():
            p.mul_(1e4)
    rows = recipe.adaptive().rows(model.disc, site_data(0.5, 0).tensors[0], 0)
    assert rows.shape == (N, 2) and rows.norm(dim=1).max() <= 1.0 + 1e-6
    assert rows[:, 0].abs().max() == pytest.approx(0.9)  # clamped at the bound


def test_generator_steps_follow_the_released_estimate():
    """W far above wd-scale: max-gen-per-disc G steps per D step; far below: the minimum
    (W = 0 would give the fixed schedule's 1 / disc-steps-per-gen-step)."""
    recipe, plan = setup()
    start = recipe.build()
    steps = {}
    for real_mean in (4.0, -4.0):
        model = copy.deepcopy(start)
        ctx = context(site_data(0.5, 0), PrivateTraining(plan, [], seed=0), {REAL_MEAN_KEY: real_mean}, steps=4)
        metrics = recipe.train_local(model, ctx)
        assert metrics["disc_steps"] == 4.0  # the private schedule never adapts
        steps[real_mean] = (metrics["gen_steps"], metrics["gen_per_disc"])
    assert steps[4.0][1] > 1.0 > steps[-4.0][1]
    assert steps[4.0][0] > 4 > steps[-4.0][0] >= 1


def test_only_the_critic_is_private_and_the_release_moves_no_parameter(monkeypatch):
    recipe, plan = setup()
    wrapped = []
    original = PrivateTraining.make_private

    def spy(self, module, optimizer, dataset, batch_size, **kwargs):
        wrapped.append(module)
        return original(self, module, optimizer, dataset, batch_size, **kwargs)

    monkeypatch.setattr(PrivateTraining, "make_private", spy)
    model = recipe.build()
    private = PrivateTraining(plan, [], seed=0)
    recipe.train_local(model, context(site_data(0.5, 0), private))
    assert wrapped == [model.disc]
    before = copy.deepcopy(model.state_dict())
    recipe.adaptive().release(recipe, model, context(site_data(0.5, 0), private))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.disc.parameters())


def test_ledger_epsilon_equals_the_opacus_accountant_with_one_release_per_round(tmp_path):
    """Two rounds through PrivacyRound: DP-SGD steps plus one (sigma_w, 1, 1) release per
    round in the one history; the plan's noise was calibrated for that composition."""
    recipe, _ = setup()
    q = sample_rate_for(N, BATCH)
    schedule = PrivacySchedule(target_epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=q,
                               total_steps=4, max_grad_norm=1.0, releases=recipe.one_off_releases())
    model, data, state = recipe.build(), site_data(0.5, 0), {}
    metrics = []
    for server_round in (1, 2):
        privacy = PrivacyRound.at(tmp_path / "ledger.json", "A", schedule, run_id="r", server_round=server_round,
                                  steps=2, cap_epsilon=8.0, seed=server_round)
        with privacy as private:
            metrics.append(recipe.train_local(model, context(data, private, state, seed=server_round)))
    sigma = privacy.plan.noise_multiplier
    assert privacy.ledger.steps == 6 and len(privacy.ledger.released) == 2
    oracle = RDPAccountant()
    for _ in range(4):
        oracle.step(noise_multiplier=sigma, sample_rate=q)
    for _ in range(2):
        oracle.step(noise_multiplier=SIGMA_W, sample_rate=1.0)
    assert privacy.epsilon == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy.epsilon <= 8.0 + 1e-6
    no_release = PrivacySchedule(**{**schedule.__dict__, "releases": ()})
    plain = PrivacyRound.at(tmp_path / "plain.json", "A", no_release, run_id="p", server_round=1, steps=2,
                            cap_epsilon=8.0)
    with plain:
        pass
    assert sigma > plain.plan.noise_multiplier  # the releases are paid for by more DP-SGD noise
    assert metrics[0]["gen_per_disc"] == 0.5 and REAL_MEAN_KEY in state  # round 1: the fixed schedule
    assert state[COUNTS_KEY][1] == 2  # the count's noise is averaged over both releases


@pytest.mark.slow
def test_two_rounds_through_flower_release_once_per_round(tiny_federation, tmp_path, simulate):
    out = tmp_path / "run"
    train = simulate(tiny_federation, out, ["recipe=site-gan", "num-rounds=2", "local-steps=2", "image-size=32",
                                            "batch-size=4", "accountant=rdp", "target-epsilon=8.0", "eval-every=0",
                                            "options.gen-width=4", "options.disc-width=4",
                                            "options.schedule=adaptive"], timeout=600)
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert set(record["per_site"]) == {"A", "B"}
        for site in record["per_site"].values():
            assert {"wd_estimate", "wd_real_mean", "gen_per_disc"} <= set(site)
    privacy = json.loads((out / "privacy.json").read_text())
    for site in ("A", "B"):
        assert privacy["node_ledgers"][site]["steps"] == 6  # 2 x 2 DP-SGD steps + 2 releases
        assert train[-1]["per_site"][site]["epsilon"] <= 8.0 + 1e-6
