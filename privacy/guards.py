"""Guards around Opacus per-sample gradients, and the slow oracle that checks them.

- ``make_conv_inputs_contiguous``: Opacus' hooks mode computes WRONG per-sample Conv
  gradients when a conv input is channels_last in memory (reproduced here with Opacus
  1.6: relative error about 1 on the conv weights, DP.md). A forward pre-hook that
  makes every conv input contiguous fixes it; ``PrivateTraining`` installs it.
- ``check_private_module``: refuses layers DP-SGD cannot train, naming the layer.
  BatchNorm mixes records within a batch; spectral norm is not supported by any
  grad-sample mode and Opacus' validator wrongly passes it (DP.md trap 5).
- ``per_sample_grads_reference``: a per-record autograd loop. Every recipe's tests
  call it on their private networks to check the fast path.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.hooks import RemovableHandle


class PrivateModuleError(ValueError):
    """A module meant for DP-SGD contains a layer that DP-SGD cannot train correctly."""


def _contiguous_inputs(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def make_conv_inputs_contiguous(module: nn.Module) -> list[RemovableHandle]:
    """Forward pre-hooks on every conv layer of ``module`` that make its input contiguous.

    Install them BEFORE wrapping in a GradSampleModule: pre-hooks run before Opacus'
    activation-capturing forward hook, so Opacus sees (and unfolds) the contiguous copy.
    Returns the hook handles (``handle.remove()`` undoes it).
    """
    return [m.register_forward_pre_hook(_contiguous_inputs)
            for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _has_spectral_norm(module: nn.Module) -> bool:
    # old API: torch.nn.utils.spectral_norm registers a SpectralNorm forward pre-hook
    from torch.nn.utils.spectral_norm import SpectralNorm
    if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
        return True
    # new API: torch.nn.utils.parametrizations.spectral_norm
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None:
        for plist in parametrizations.values():
            if any(type(p).__name__ == "_SpectralNorm" for p in plist):
                return True
    return False


def assert_no_spectral_norm(module: nn.Module) -> None:
    """Raise PrivateModuleError naming every spectrally normalised layer of ``module``."""
    names = [name or "<root>" for name, m in module.named_modules() if _has_spectral_norm(m)]
    if names:
        raise PrivateModuleError(
            f"spectral norm on layer(s) {', '.join(names)}: no Opacus grad-sample mode computes "
            "correct per-sample gradients through it. Remove spectral_norm from networks that "
            "see real records (use GroupNorm / weight clipping / a gradient penalty instead).")


def check_private_module(module: nn.Module) -> None:
    """Refuse a module that DP-SGD cannot train; every message names the offending layer."""
    batch_norms = [f"{name} ({type(m).__name__})" for name, m in module.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise PrivateModuleError(
            f"BatchNorm in a network that sees real records: layer(s) {', '.join(batch_norms)}. "
            "BatchNorm mixes records within a batch, so per-record clipping cannot bound one "
            "patient's influence. Use GroupNorm or InstanceNorm "
            "(opacus.validators.ModuleValidator.fix does this).")
    assert_no_spectral_norm(module)
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise PrivateModuleError(f"module {type(module).__name__} cannot be trained with DP-SGD: "
                                 + "; ".join(str(e) for e in errors))


def per_sample_grads_reference(module: nn.Module, loss_fn: Callable[..., torch.Tensor],
                               *inputs: Any) -> list[torch.Tensor]:
    """Per-record gradients by a plain autograd loop: the oracle for the fast path.

    ``loss_fn(module, *record_inputs)`` returns the scalar loss of ONE record, where each
    tensor in ``inputs`` is sliced to ``[i:i+1]`` along dim 0 (other inputs pass as-is).
    Returns one tensor ``[N, *param.shape]`` per trainable parameter, in
    ``module.parameters()`` order (the order of a DPOptimizer's ``params`` when the
    optimizer was built from ``module.parameters()``). Unused parameters get zeros.
    ``module`` may be the Opacus-wrapped module: its hooks are paused during the loop
    (pass the wrapper, not a deepcopy of the wrapped network: a copy carries stale hooks).
    """
    pause = getattr(module, "disable_hooks", None)
    was_enabled = getattr(module, "hooks_enabled", False)
    if pause is not None:
        pause()
    try:
        return _per_record_loop(module, loss_fn, inputs)
    finally:
        if pause is not None and was_enabled:
            module.enable_hooks()


def _per_record_loop(module: nn.Module, loss_fn: Callable[..., torch.Tensor],
                     inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = {x.shape[0] for x in inputs if torch.is_tensor(x)}
    if len(sizes) != 1:
        raise ValueError(f"per_sample_grads_reference: tensor inputs must share one batch size, got {sizes}")
    n = sizes.pop()
    per_record: list[list[torch.Tensor]] = []
    for i in range(n):
        record = [x[i:i + 1] if torch.is_tensor(x) else x for x in inputs]
        loss = loss_fn(module, *record)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        per_record.append([torch.zeros_like(p) if g is None else g.detach()
                           for p, g in zip(params, grads)])
    if n == 0:
        return [p.new_zeros((0, *p.shape)) for p in params]
    return [torch.stack(column) for column in zip(*per_record)]
