"""PrivateTraining and guards: per-sample gradients against the autograd oracle,
accounting per step, public gradients as post-processing, empty batches, refusals."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from medgen.privacy.accounting import epsilon_of, sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.guards import PrivateModuleError, per_sample_grads_reference
from medgen.privacy.ledger import PrivacyPlan

torch.set_num_threads(1)
N, BATCH = 24, 8
Q = sample_rate_for(N, BATCH)


class ToChannelsLast(nn.Module):
    """Emits a channels_last tensor between convs, as MONAI's attention blocks do."""

    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2), ToChannelsLast(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 1))


def record_loss(module, x, y):
    return ((module(x) - y) ** 2).sum()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N, 1, 16, 16, generator=g), torch.randn(N, 1, generator=g))


def plan(sigma=1.0, clip=1.0):
    return PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=Q,
                       total_steps=100, noise_multiplier=sigma, max_grad_norm=clip)


def fast_grads(module, x, y):
    """Per-sample grads from an Opacus-wrapped module, batch loss = mean of record losses."""
    for p in module.parameters():
        p.grad_sample = None
    out = module(x)
    ((out - y) ** 2).sum(dim=1).mean().backward()
    return [p.grad_sample.clone() for p in module.parameters()]


def max_rel_error(fast, ref):
    return max(float((f - r).abs().max() / r.abs().max()) for f, r in zip(fast, ref))


@pytest.mark.parametrize("mode,channels_last", [("hooks", False), ("hooks", True), ("functorch", True)])
def test_wrapped_per_sample_grads_match_the_autograd_oracle(mode, channels_last):
    net = small_net()
    x, y = data().tensors
    x = x[:6].contiguous(memory_format=torch.channels_last) if channels_last else x[:6]
    reference = per_sample_grads_reference(copy.deepcopy(net), record_loss, x, y[:6])
    private = PrivateTraining(plan(), [], seed=0)
    wrapped, _, _ = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH,
                                         grad_sample_mode=mode)
    fast = fast_grads(wrapped, x, y[:6])
    for f, r in zip(fast, reference):
        assert f.shape == r.shape
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-4)


def test_without_the_guard_opacus_gets_channels_last_convs_wrong():
    # documents the bug the guard exists for (Opacus 1.6 hooks mode, DP.md)
    net = small_net()
    x, y = data().tensors
    reference = per_sample_grads_reference(copy.deepcopy(net), record_loss, x[:6], y[:6])
    unguarded = GradSampleModule(net, loss_reduction="mean")
    assert max_rel_error(fast_grads(unguarded, x[:6], y[:6]), reference) > 0.1


def test_accountant_records_exactly_one_step_per_call_after_the_restored_history():
    restored = [(1.3, Q, 5)]
    net = small_net()
    private = PrivateTraining(plan(sigma=0.8), restored, seed=0)
    wrapped, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH)
    for k, (x, y) in zip(range(3), loader):
        ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()
        private.step(opt)
    assert private.steps_taken == 3
    assert private.history == [(1.3, Q, 5), (0.8, Q, 3)]
    private.close()  # hooks gone: the plain module is copyable and records nothing
    copy.deepcopy(net)(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(not hasattr(m, "activations") or not m.activations for m in net.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    fresh = RDPAccountant()
    for sigma, steps in [(1.3, 5), (0.8, 3)]:
        for _ in range(steps):
            fresh.step(noise_multiplier=sigma, sample_rate=Q)
    assert private.epsilon(1e-5) == fresh.get_epsilon(delta=1e-5) == epsilon_of(fresh.history, 1e-5, "rdp")
    assert restored == [(1.3, Q, 5)]  # caller's history untouched


def test_public_grads_are_added_after_clipping_and_noise_unchanged():
    clip = 0.05  # far below the per-record gradient norms: every record is clipped
    net = small_net()
    private = PrivateTraining(plan(sigma=0.0, clip=clip), [], seed=3)
    wrapped, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0), data(), BATCH)
    x, y = next(iter(loader))
    assert len(x) > 0
    before = [p.detach().clone() for p in net.parameters()]
    reference = per_sample_grads_reference(wrapped, record_loss, x, y)  # hooks paused inside
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in reference], dim=1).norm(dim=1)
    assert bool((norms > clip).all())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped_mean = [torch.einsum("i,i...->...", factor, g) / int(N * Q) for g in reference]
    public = [torch.full_like(p, 100.0) if i % 2 == 0 else None for i, p in enumerate(net.parameters())]

    ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()
    private.step(opt, public)
    for p, b, c, g in zip(net.parameters(), before, clipped_mean, public):
        expected = b - c - (g if g is not None else 0)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None and p.grad_sample is None for p in net.parameters())
    assert private.history == [(0.0, Q, 1)]


def test_public_pass_keeps_fake_samples_out_of_the_per_sample_hooks():
    net = small_net()
    private = PrivateTraining(plan(), [], seed=0)
    wrapped, opt, _ = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH)
    with private.public_pass(wrapped):
        grads = private.public_grads(wrapped(torch.randn(5, 1, 16, 16)).mean(), opt)
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, opt.params))
    assert all(getattr(p, "grad_sample", None) is None for p in opt.params)
    x, y = data().tensors
    ((wrapped(x[:4]) - y[:4]) ** 2).sum(dim=1).mean().backward()  # activations not misaligned
    assert all(p.grad_sample.shape[0] == 4 for p in opt.params)


@pytest.mark.parametrize("forward_empty", [False, True])
def test_an_empty_poisson_batch_still_takes_an_accounted_noise_step(forward_empty):
    net = small_net()
    private = PrivateTraining(plan(sigma=1.0), [], seed=5)
    wrapped, opt, _ = private.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0), data(), BATCH)
    before = [p.detach().clone() for p in net.parameters()]
    if forward_empty:
        ((wrapped(torch.empty(0, 1, 16, 16)) - torch.empty(0, 1)) ** 2).sum().backward()
    private.step(opt)
    assert private.history == [(1.0, Q, 1)]
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))  # noise applied


def test_same_seed_same_round():
    results = []
    for _ in range(2):
        net = small_net()
        private = PrivateTraining(plan(), [], seed=11)
        wrapped, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH)
        x, y = next(iter(loader))
        ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()
        private.step(opt)
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _refused(net):
    private = PrivateTraining(plan(), [])
    with pytest.raises(PrivateModuleError) as err:
        private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH)
    return str(err.value)


def test_make_private_refuses_batchnorm_naming_the_layer():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    assert "1 (BatchNorm2d)" in _refused(net)


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_make_private_refuses_spectral_norm_naming_the_layer(api):
    conv = nn.Conv2d(4, 4, 3)
    if api == "hook":
        conv = nn.utils.spectral_norm(conv)
    else:
        conv = nn.utils.parametrizations.spectral_norm(conv)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), conv)
    message = _refused(net)
    assert "spectral norm" in message and "layer(s) 2" in message


def test_make_private_refuses_sampling_faster_than_planned_and_accounts_the_true_rate():
    net = small_net()
    with pytest.raises(ValueError, match="sample_rate"):
        PrivateTraining(plan(), []).make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH * 2)
    # a slower rate (plan made with B/N = 0.4, Opacus samples 10 records at B=4 at 1/3) is
    # allowed, and the history records the rate actually used
    small = TensorDataset(*(t[:10] for t in data().tensors))
    private = PrivateTraining(PrivacyPlan(10.0, 1e-5, "rdp", 0.4, 100, 1.0, 1.0), [], seed=0)
    wrapped, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), small, 4)
    private.step(opt)
    assert private.history == [(1.0, 1 / 3, 1)]


def test_rounds_through_the_ledger_account_like_one_uninterrupted_run(tmp_path):
    from medgen.privacy.ledger import PrivacyLedger

    path = tmp_path / "ledger.json"
    for server_round in (1, 2):  # a fresh process each round: reopen the ledger from disk
        ledger = PrivacyLedger.open(path, site="A")
        p = ledger.ensure_plan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=Q,
                               total_steps=6, max_grad_norm=1.0)
        ledger.check_budget(3, cap_epsilon=10.0)
        net = small_net()
        private = PrivateTraining(p, ledger.history, seed=server_round)
        wrapped, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH)
        for _, (x, y) in zip(range(3), loader):
            ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()
            private.step(opt)
        private.close()
        ledger.commit_round(run_id="run", server_round=server_round, spend=private.spend())
    fresh = RDPAccountant()
    for _ in range(6):
        fresh.step(noise_multiplier=p.noise_multiplier, sample_rate=Q)
    reopened = PrivacyLedger.open(path, site="A")
    assert reopened.history == [(p.noise_multiplier, Q, 6)]
    assert reopened.spent_epsilon() == fresh.get_epsilon(delta=1e-5) <= 10.0
