"""What a recipe gets for one round of local training: ``RoundContext``.

One object instead of eight positional arguments, built by the node (client/app.py) once
per round. The privacy-relevant split is in the field names: ``data`` is the site's
private records (reachable for training only through ``private``: DP-SGD via
``privacy.dp_step.DPModule`` and declared one-off releases), ``public`` is free to use.

Randomness: the node derives ONE round seed (run seed, site, round). ``PrivateTraining``
draws its Poisson sampling and noise from it in simulation; the recipe's own public draws
(label maps, latent noise, timesteps) come from ``generator(stream)``, a stream of that
seed that never coincides with another stream or another round's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medgen.privacy.dp_sgd import PrivateTraining


@dataclass(frozen=True)
class PublicData:
    """Inputs any site may use at no privacy cost: label maps from a public anatomy bank."""

    label_maps: torch.Tensor  # [M,H,W] int64, values index the run's label-names

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        index = torch.randint(0, self.label_maps.shape[0], (n,), generator=generator)
        return self.label_maps[index]

    def check_size(self, size: int) -> None:
        maps = self.label_maps
        if maps.dim() != 3 or maps.shape[0] < 1 or tuple(maps.shape[1:]) != (size, size):
            raise ValueError(f"public label maps have shape {tuple(maps.shape)}; expected "
                             f"[M>=1, {size}, {size}] for image-size {size}")


@dataclass(frozen=True)
class RoundContext:
    """One round at one site: private records, public inputs, the DP training object."""

    data: Dataset                  # this site's patients: one item = one patient (the unit)
    public: PublicData | None      # public label maps (None: the recipe needs none)
    private: PrivateTraining       # the only door to ``data`` (privacy/round.py opened it)
    site_index: int
    steps: int                     # private optimizer steps to take, exactly
    recipe_state: dict[str, Any] = field(default_factory=dict)  # node-local, persisted
    device: torch.device = torch.device("cpu")
    seed: int = 0                  # the node's round seed (client/app.py derives it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))  # "cpu" or a device

    def stream_seed(self, stream: int = 0) -> int:
        """The seed of the recipe's public-draw stream ``stream`` (0, 1, ...) this round."""
        state = np.random.SeedSequence([int(self.seed), int(stream)]).generate_state(1, np.uint64)[0]
        return int(state) % 2**63

    def generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator for the recipe's public draws (label maps, latent noise, timesteps)."""
        return torch.Generator().manual_seed(self.stream_seed(stream))

    # -- node-local recipe state between rounds ------------------------------------------
    @property
    def rounds_done(self) -> int:
        """Rounds this site has trained in this run before the current one."""
        return int(self.recipe_state.get("rounds_trained", 0))

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, key: str) -> None:
        restore_optimizer(optimizer, self.recipe_state, key)

    def keep_optimizer(self, optimizer: torch.optim.Optimizer, key: str) -> None:
        keep_optimizer(optimizer, self.recipe_state, key)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], key: str) -> None:
    """Load the optimizer state kept at ``state[key]`` (Adam's moments: post-processing of
    noised gradients, node-local), if any."""
    if key not in state:
        return
    try:
        optimizer.load_state_dict(state[key])
    except (ValueError, KeyError) as err:
        raise RuntimeError(f"local_state['{key}'] does not match the network ({err}); the recipe "
                           "options changed since the last round: delete this node's local state") from None


def keep_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], key: str) -> None:
    """Store the optimizer state at ``state[key]`` as CPU tensors (the node torch.saves it)."""
    state[key] = _cpu_copy(optimizer.state_dict())


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj
