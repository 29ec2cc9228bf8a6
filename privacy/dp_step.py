"""The DP-SGD skeleton every recipe repeated, once: wrap, stream batches, step, unwrap.

    with DPModule(ctx.private, model.disc, optimizer, ctx.data, batch_size) as d:
        for batch in d.batches(ctx.steps):        # Poisson batches, exactly `steps` of them
            d.zero_grad()                          # DP.md trap 1
            with d.public_pass():                  # generated/public inputs: hooks off, free
                grads = d.public_grads(fake_loss_of(d.module))
            real_loss_of(d.module, batch).backward()   # the only place real records enter
            d.step(grads)                          # clip + noise the real part, add the rest
            with d.frozen():                       # a public-only update of another network
                ...                                # (GAN G step) reading D's released weights

On exit, even after an exception: gradients cleared, Opacus' wrapper removed from the
module (``to_standard_module``), and ``PrivateTraining.close`` drops the contiguity guard.
The accounting is ``PrivateTraining``'s; this object only keeps the recipe's loop honest:
it takes exactly ``steps`` private steps, an empty Poisson batch still takes a noise-only
(accounted) step, and nothing un-noised is left on the private module when another
network trains from it (``assert_released``).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from medgen.privacy.dp_sgd import PrivateTraining


class DPModule:
    """One round of DP-SGD on one private module (see the module docstring)."""

    def __init__(self, private: PrivateTraining, module: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Dataset, batch_size: int, *, grad_sample_mode: str = "hooks"):
        self.private = private
        self.plain = module  # the module itself: what other networks read between steps
        self._optimizer, self._data, self._batch_size = optimizer, data, batch_size
        self._mode = grad_sample_mode
        self.module: nn.Module | None = None     # the wrapped module (per-sample gradients)
        self.optimizer: Any = None               # the DPOptimizer
        self._loader = None

    def __enter__(self) -> "DPModule":
        self.module, self.optimizer, self._loader = self.private.make_private(
            self.plain, self._optimizer, self._data, self._batch_size, grad_sample_mode=self._mode)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.module, "to_standard_module"):  # "no_op" mode leaves no wrapper
            self.module.to_standard_module()  # removes Opacus' hooks and attributes
        self.private.close()
        return False

    def batches(self, steps: int) -> Iterator[Any]:
        """Exactly ``steps`` Poisson batches (an exhausted loader starts another pass)."""
        batches = iter(self._loader)
        for _ in range(steps):
            try:
                batch = next(batches)
            except StopIteration:  # the Poisson loader's "epoch" ended: start another
                batches = iter(self._loader)
                batch = next(batches)
            yield batch

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, public_grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Clip + noise the real part, add ``public_grads`` (post-processing), optimizer step."""
        self.private.step(self.optimizer, public_grads)

    def public_pass(self) -> contextlib.AbstractContextManager[None]:
        """Forward/backward on public or generated inputs: per-sample hooks paused."""
        return self.private.public_pass(self.module)

    def public_grads(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """Gradients of a public-only ``loss`` w.r.t. the private parameters."""
        return self.private.public_grads(loss, self.optimizer)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[nn.Module]:
        """The private module as a fixed, released function for another network's update
        (a GAN's G step): checked free of un-noised state, hooks off, parameters frozen
        (DP.md trap 2: freezing with hooks on crashes; hooks on cost 3x)."""
        assert_released(self.plain)
        self.module.disable_hooks()
        self.plain.requires_grad_(False)
        try:
            yield self.plain
        finally:
            self.plain.requires_grad_(True)
            self.module.enable_hooks()


def assert_released(module: nn.Module) -> None:
    """The post-processing guard: ``module`` carries only its released (noised) parameters.

    Per-sample gradients, their clipped sum before noise, and activations captured by
    Opacus' hooks are functions of the private batch without noise. If any were left on
    the module when another network trains from it, that update could read them.
    """
    for name, p in module.named_parameters():
        for attr in ("grad_sample", "summed_grad"):
            if getattr(p, attr, None) is not None:
                raise AssertionError(f"{name}.{attr} holds un-noised private state during a public "
                                     "update; zero the private module's gradients after every step")
    for name, sub in module.named_modules():
        if getattr(sub, "activations", None):
            raise AssertionError(f"{name or 'the module'} holds captured private activations "
                                 "during a public update")


def clip_total_norm(grads: Sequence[torch.Tensor | None], max_norm: float) -> list[torch.Tensor | None]:
    """Scale public gradients down to total L2 norm ``max_norm`` (no-op below it).

    A private step's real term reaches the optimizer as a mean of per-patient gradients
    clipped to C; an exact, unclipped public term can be several times larger and drown
    it. Bounding it by the same C balances the two. Post-processing of public inputs: it
    changes nothing in the accounting.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in present))
    scale = min(1.0, max_norm / (float(norm) + 1e-12))
    return [None if g is None else g * scale for g in grads]


def per_record_grads(module: nn.Module, record_loss: Callable[..., torch.Tensor],
                     *records: torch.Tensor) -> dict[str, torch.Tensor]:
    """One gradient per record {name: [N, *param.shape]} (torch.func), for recipes that write
    ``p.grad_sample`` themselves (Opacus' grad_sample_mode "no_op"): ``record_loss(forward,
    *batch) -> [N]`` is the recipe's per-record loss, ``forward`` the module with the
    parameters being differentiated, and each record is evaluated as a batch of one, so its
    gradient is its own whatever the others hold."""
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}

    def one(p: dict[str, torch.Tensor], *record: torch.Tensor) -> torch.Tensor:
        def forward(*args, **kwargs):
            return functional_call(module, p, args, kwargs)
        return record_loss(forward, *(r[None] for r in record))[0]

    return vmap(grad(one), in_dims=(None, *[0] * len(records)))(params, *records)
