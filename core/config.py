"""The one typed run configuration.

``RunConfig`` is what a coordinator writes (TOML file plus command-line overrides), what
Flower carries to every node as its run config (flat, hyphenated scalar keys), and what
every part of medgen reads back. Recipe-specific options travel under ``options.<name>``
and are parsed by the recipe's own ``Options`` dataclass (models/recipe.py).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

Scalar = bool | int | float | str

ACCOUNTANTS = ("prv", "rdp")
AGGREGATIONS = ("mean", "median", "trimmed-mean")


class ConfigError(ValueError):
    """A run-config field is missing, mistyped or out of range; the message names it."""


@dataclass(frozen=True)
class RunConfig:
    # what to train
    recipe: str = "dp-cgan"
    num_rounds: int = 10
    local_steps: int = 20
    batch_size: int = 32
    image_size: int = 64
    seed: int = 0
    device: str = "auto"
    # record-level DP per site; the unit is the patient (docs/privacy.md)
    target_epsilon: float = 10.0
    delta: float = 1e-5
    accountant: str = "prv"
    max_grad_norm: float = 1.0
    # federation: site names in index order (a site's index is its conditioning id)
    sites: str = "A,B,C,D"
    # the label schema's class names in value order (label value = index), from the
    # federation's dataset.toml (medgen-server simulate fills it); the default is the
    # embedded brain federation's schema. Every recipe, segmenter and release sizes from it.
    label_names: str = "background,csf,gm,wm"
    min_sites: int = 2
    round_timeout: float = 3600.0
    # simulation only (`medgen-server simulate`, docs/simulated-federation.md): how many
    # simulated sites train at once (Flower's Ray backend init-args-num-cpus with one CPU per
    # site; 0 = one per CPU of the machine), and the fraction of each round's replies that
    # are lost after the site trained (a reply that fails or never comes; 0 = none)
    simulate_actors: int = 0
    simulate_dropout: float = 0.0
    # where things are (simulation fills data-root/state-root; deployment uses node config)
    data_root: str = ""
    state_root: str = ""
    run_dir: str = "runs/latest"
    resume: bool = True
    # the coordinator process that owns run-dir (server/run_lock.py); written into DONE
    coordinator_id: str = ""
    # evaluation on the coordinator's held-out data (never on a site's training data)
    eval_every: int = 1
    eval_samples: int = 64
    # federated evaluation at the sites (docs/evaluation.md, "Federated evaluation"): the
    # fraction of each site's patients reserved for it (never trained on; 0 = off), the
    # noise multiplier of its one Gaussian release per evaluation, and how often (every N
    # rounds; 0 = the final round only). Its releases are planned into the site's budget.
    federated_eval_fraction: float = 0.0
    federated_eval_noise: float = 4.0
    federated_eval_every: int = 0
    # security (docs/security.md): SecAgg+ (server never sees one site's update),
    # robust aggregation (privacy/robust.py), optional client-level DP (unit: the site)
    secure_aggregation: bool = False
    secagg_max_dropped: int = 1
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    norm_outlier_mads: float = 3.0
    # self-declared num-examples bounded (server/aggregation.py): an absolute cap per site
    # (0 = none) and at most this multiple of the round's lower-median weight
    max_num_examples: float = 0.0
    max_weight_ratio: float = 3.0
    client_dp_noise_multiplier: float = 0.0
    client_dp_clipping_norm: float = 1.0
    # recipe-specific options, parsed by the recipe (see models/recipe.py)
    options: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.sites.split(",") if name.strip())

    @property
    def class_names(self) -> tuple[str, ...]:
        """The label schema's class names; label value i is ``class_names[i]``."""
        return tuple(name.strip() for name in self.label_names.split(",") if name.strip())

    @property
    def federated_eval_rounds(self) -> tuple[int, ...]:
        """The absolute rounds after which sites evaluate (empty when the fraction is 0)."""
        if self.federated_eval_fraction == 0:
            return ()
        every = self.federated_eval_every
        return tuple(r for r in range(1, self.num_rounds + 1)
                     if r == self.num_rounds or (every and r % every == 0))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- Flower run config (flat scalar dict, hyphenated keys) -------------------------
    def to_run_config(self) -> dict[str, Scalar]:
        flat: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "options":
                for key, option in value.items():
                    flat[f"options.{key}"] = option
            else:
                flat[_key(f.name)] = value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        known = {_key(f.name): f for f in fields(cls) if f.name != "options"}
        values: dict[str, Any] = {}
        options: dict[str, Scalar] = {}
        for key, value in run_config.items():
            if key.startswith("options."):
                options[key[len("options."):]] = value
            elif key in known:
                values[known[key].name] = _coerce(key, value, known[key].type)
            else:
                raise ConfigError(f"unknown run-config key '{key}'; known keys: "
                                  f"{', '.join(sorted(known))}, options.<name>")
        return cls(**values, options=options)

    # -- files and overrides --------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "RunConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        flat = _flatten(data)
        flat.update(overrides or {})
        try:
            return cls.from_run_config(flat)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        lines, option_lines = [], []
        for key, value in self.to_run_config().items():
            target = option_lines if key.startswith("options.") else lines
            name = key.split(".", 1)[1] if key.startswith("options.") else key
            target.append(f"{name} = {_toml_value(value)}")
        text = "\n".join(lines) + "\n"
        if option_lines:
            text += "\n[options]\n" + "\n".join(option_lines) + "\n"
        return text


def parse_overrides(items: list[str]) -> dict[str, Scalar]:
    """Parse ``key=value`` command-line overrides; values are TOML scalars or bare strings."""
    out: dict[str, Scalar] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def _key(name: str) -> str:
    return name.replace("_", "-")


def _validate(config: "RunConfig") -> None:
    """Every field in range and consistent with the others; the error names the key."""
    c, sites = config, config.site_names
    _require(c.num_rounds >= 1, "num-rounds", "must be >= 1")
    _require(c.local_steps >= 1, "local-steps", "must be >= 1")
    _require(c.batch_size >= 1, "batch-size", "must be >= 1")
    _require(16 <= c.image_size <= 256 and c.image_size % 16 == 0, "image-size",
             "must be a multiple of 16 between 16 and 256")
    _require(0 <= c.seed < 2 ** 63, "seed", "must be in [0, 2**63)")
    _require(_finite(c.target_epsilon) and c.target_epsilon > 0, "target-epsilon",
             f"must be a finite number > 0 (the noise is calibrated to it), got {c.target_epsilon!r}")
    _require(_finite(c.delta) and 0 < c.delta < 1, "delta", f"must be in (0, 1), got {c.delta!r}")
    _require(c.accountant in ACCOUNTANTS, "accountant", f"must be one of {ACCOUNTANTS}")
    _require(_finite(c.max_grad_norm) and c.max_grad_norm > 0, "max-grad-norm",
             f"must be a finite number > 0 (per-sample clipping bound), got {c.max_grad_norm!r}")
    _require(len(sites) >= 1 and len(set(sites)) == len(sites),
             "sites", "must be a comma-separated list of distinct site names")
    classes = c.class_names
    _require(len(classes) >= 2 and len(set(classes)) == len(classes), "label-names",
             f"must be a comma-separated list of at least 2 distinct class names (label value = "
             f"position), got {c.label_names!r}")
    _require(1 <= c.min_sites <= len(sites), "min-sites",
             f"must be between 1 and the number of sites ({len(sites)}: {c.sites}), got {c.min_sites}")
    _require(_finite(c.round_timeout) and c.round_timeout > 0, "round-timeout",
             f"must be a finite number of seconds > 0 (use a large value for no practical limit), "
             f"got {c.round_timeout!r}")
    _require(c.simulate_actors >= 0, "simulate-actors",
             f"must be >= 0 (sites training at once in simulation; 0 = one per CPU), got {c.simulate_actors}")
    _require(_finite(c.simulate_dropout) and 0.0 <= c.simulate_dropout < 1.0, "simulate-dropout",
             f"must be in [0, 1) (the fraction of a round's replies lost in simulation), got {c.simulate_dropout!r}")
    _require(c.eval_every >= 0, "eval-every", "must be >= 0 (0 disables evaluation)")
    _require(c.eval_samples >= 0, "eval-samples", f"must be >= 0, got {c.eval_samples}")
    _require(c.eval_every == 0 or c.eval_samples >= 2, "eval-samples",
             f"must be >= 2 when eval-every > 0 (a feature distance needs at least 2 generated "
             f"images per site), got {c.eval_samples}; or set eval-every = 0")
    _require(_finite(c.federated_eval_fraction) and 0.0 <= c.federated_eval_fraction <= 0.5,
             "federated-eval-fraction", "must be in [0, 0.5] (0 disables federated evaluation; "
             f"the rest of a site's patients train), got {c.federated_eval_fraction!r}")
    _require(_finite(c.federated_eval_noise) and c.federated_eval_noise >= 0.5,
             "federated-eval-noise", "must be a finite noise multiplier >= 0.5 (one Gaussian "
             f"release per evaluation), got {c.federated_eval_noise!r}")
    _require(c.federated_eval_every >= 0, "federated-eval-every",
             f"must be >= 0 (0: the final round only), got {c.federated_eval_every}")
    _require(c.secagg_max_dropped >= 0, "secagg-max-dropped", "must be >= 0")
    if c.secure_aggregation:
        _require(len(sites) >= 3, "sites", "must name at least 3 sites with secure-aggregation = "
                 "true (with 2, each site learns the other's update from the sum)")
        _require(c.secagg_max_dropped < len(sites) / 2, "secagg-max-dropped",
                 f"must be in [0, {(len(sites) - 1) // 2}] for {len(sites)} sites (a reconstruction "
                 "threshold at or below half the sites lets the server unmask one site)")
    _require(c.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
    _require(_finite(c.trim_fraction) and 0.0 <= c.trim_fraction < 0.5, "trim-fraction",
             "must be in [0, 0.5)")
    _require(_finite(c.norm_outlier_mads) and c.norm_outlier_mads >= 0, "norm-outlier-mads",
             "must be a finite number >= 0 (0 disables it)")
    _require(_finite(c.client_dp_noise_multiplier) and c.client_dp_noise_multiplier >= 0,
             "client-dp-noise-multiplier", "must be a finite number >= 0 (0 disables client-level DP)")
    _require(_finite(c.max_num_examples) and c.max_num_examples >= 0, "max-num-examples",
             "must be a finite number >= 0 (0: no absolute cap on a site's num-examples)")
    _require(_finite(c.max_weight_ratio) and c.max_weight_ratio >= 1, "max-weight-ratio",
             "must be a finite number >= 1 (a site's weight relative to the round's median)")
    _require(_finite(c.client_dp_clipping_norm) and c.client_dp_clipping_norm > 0,
             "client-dp-clipping-norm", "must be a finite number > 0")
    _require(not (c.secure_aggregation and c.aggregation != "mean"), "aggregation",
             "must be 'mean' with secure-aggregation = true (the server only sees the sum)")
    _require(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
             "device", "must be 'auto', 'cpu' or 'cuda[:N]'")
    for key, value in c.options.items():
        _require(not isinstance(value, float) or math.isfinite(value), f"options.{key}",
                 f"must be finite, got {value!r}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"run-config field '{key}' {why}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(annotation))
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config field '{key}' must be true or false, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"run-config field '{key}' must be {kind.__name__}, got {value!r}")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
