"""The hospital's allow-list: which runs its node agrees to train, checked at the node.

Flower's ``--trusted-entities`` only accepts FABs signed through Flower's hub, so a
self-hosted federation pins hospitals to approved code here instead (FLOWER.md "Layout and
app loading"). The FAB is a shim over the INSTALLED medgen, so the code that runs is the
hospital's; this file says which version of it the hospital approved, and which recipes
and run configurations it agrees to train. It lives at the hospital, is read only there,
and the coordinator never sees it.

    # allow.toml
    medgen-version = "0.1.0"          # the approved release; must equal the installed one
    recipes = ["dp-cgan"]             # recipes this hospital trains
    [fixed]                           # run-config keys that must have exactly this value
    accountant = "prv"
    [ranges]                          # numeric run-config keys: inclusive bounds
    num-rounds = { max = 200 }
    local-steps = { min = 1, max = 100 }
    [ranges.options]                  # recipe options: options.<name>
    gen-width = { max = 64 }
    [choices]                         # run-config keys: allowed values
    device = ["auto", "cuda", "cpu"]

Keys are RunConfig keys (``medgen-server run --set`` spelling) or ``options.<name>``.
A key the run does not set is not checked (the installed recipe's default applies, and
that code is what the hospital approved). The epsilon a site spends is not an allow-list
matter: the node's ``epsilon-cap`` always tightens the run's target (client/node.py).

A refusal is an error reply whose reason names the offending keys and values (the
coordinator's own settings, never a local path); nothing is trained, nothing is charged.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import medgen
from medgen.config import RunConfig, Scalar

NODE_CONFIG_KEY = "allow-list"   # --node-config key holding the allow-list path
VERSION_KEY = "medgen-version"   # the coordinator's version, in the train ConfigRecord
NOT_ALLOWED = 4003               # error code of a refusal (client/app.py: 4001, 4002)
_SECTIONS = {VERSION_KEY, "recipes", "fixed", "ranges", "choices"}


class AllowListError(ValueError):
    """The allow-list file is missing or malformed; the message names the file and field."""


class NotAllowed(RuntimeError):
    """The run is not on this hospital's allow-list. The message is path-free by design."""


@dataclass(frozen=True)
class Bounds:
    low: float = -math.inf
    high: float = math.inf

    def __contains__(self, value: Any) -> bool:
        return _is_number(value) and self.low <= float(value) <= self.high

    def __str__(self) -> str:
        low = "" if math.isinf(self.low) else f"{self.low:g} <= "
        high = "" if math.isinf(self.high) else f" <= {self.high:g}"
        return f"{low}value{high}"


@dataclass(frozen=True)
class AllowList:
    medgen_version: str
    recipes: tuple[str, ...]
    fixed: Mapping[str, Scalar] = field(default_factory=dict)
    ranges: Mapping[str, Bounds] = field(default_factory=dict)
    choices: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "AllowList":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AllowListError(f"allow-list {path} does not exist; write one (see docs/"
                                 "deployment.md) or start medgen-client without --allow") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise AllowListError(f"allow-list {path} is not valid TOML: {err}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "allow-list") -> "AllowList":
        unknown = set(data) - _SECTIONS
        if unknown:
            raise AllowListError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; "
                                 f"allowed: {', '.join(sorted(_SECTIONS))}")
        version = data.get(VERSION_KEY)
        if not isinstance(version, str) or not version.strip():
            raise AllowListError(f"{source}: '{VERSION_KEY}' must name the approved medgen release, "
                                 'e.g. medgen-version = "0.1.0"')
        recipes = data.get("recipes")
        if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
            raise AllowListError(f"{source}: 'recipes' must be a non-empty list of recipe names, "
                                 'e.g. recipes = ["dp-cgan"]')
        fixed = _flat_table(data, "fixed", source)
        ranges = {key: _bounds(key, spec, source) for key, spec in
                  _flat_table(data, "ranges", source, leaf=_is_bounds_spec).items()}
        choices = {}
        for key, values in _flat_table(data, "choices", source).items():
            if not isinstance(values, list) or not values:
                raise AllowListError(f"{source}: choices.{key} must be a non-empty list of values")
            choices[key] = tuple(values)
        return cls(version.strip(), tuple(recipes), fixed, ranges, choices)

    def violations(self, config: RunConfig, installed_version: str,
                   coordinator_version: str | None = None) -> list[str]:
        """Every reason to refuse ``config`` (empty: allowed). Texts name keys and values only."""
        found = []
        if installed_version != self.medgen_version:
            found.append(f"installed medgen {installed_version} is not the approved release "
                         f"{self.medgen_version}")
        if coordinator_version is not None and coordinator_version != installed_version:
            found.append(f"the coordinator runs medgen {coordinator_version}, this hospital "
                         f"{installed_version}")
        if config.recipe not in self.recipes:
            found.append(f"recipe {config.recipe!r} is not allowed (allowed: {', '.join(self.recipes)})")
        values = config.to_run_config()
        for key, expected in self.fixed.items():
            if key in values and not _same(values[key], expected):
                found.append(f"{key} = {values[key]!r} must be {expected!r}")
        for key, bounds in self.ranges.items():
            if key in values and values[key] not in bounds:
                found.append(f"{key} = {values[key]!r} is outside the allowed range {bounds}")
        for key, allowed in self.choices.items():
            if key in values and not any(_same(values[key], a) for a in allowed):
                found.append(f"{key} = {values[key]!r} is not one of {list(allowed)}")
        return found

    def check(self, config: RunConfig, installed_version: str,
              coordinator_version: str | None = None) -> None:
        found = self.violations(config, installed_version, coordinator_version)
        if found:
            raise NotAllowed("refused by the hospital's allow-list: " + "; ".join(found))


def enforce_node_allow_list(node_config: Mapping[str, Any], config: RunConfig,
                            train_config: Mapping[str, Any] | None = None) -> None:
    """The ClientApp's check: a node started with an allow-list trains only what it allows.

    Raises ``NotAllowed`` (reply with an error, train nothing) or ``AllowListError`` (the
    hospital's own file is broken: also refuse). A node without ``allow-list`` in its
    node config accepts every run of its installed medgen (simulation, development).
    """
    path = node_config.get(NODE_CONFIG_KEY)
    if not path:
        return
    coordinator = (train_config or {}).get(VERSION_KEY)
    AllowList.load(str(path)).check(config, medgen.__version__,
                                    str(coordinator) if coordinator is not None else None)


# -- parsing helpers -----------------------------------------------------------------
_KNOWN_KEYS = {f.name.replace("_", "-") for f in fields(RunConfig) if f.name != "options"}


def _flat_table(data: Mapping[str, Any], section: str, source: str, leaf=lambda v: False) -> dict[str, Any]:
    table = data.get(section, {})
    if not isinstance(table, Mapping):
        raise AllowListError(f"{source}: '{section}' must be a table ([{section}])")
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            full = f"{prefix}{key}"
            if isinstance(value, Mapping) and not leaf(value):
                walk(f"{full}.", value)
            else:
                flat[full] = value

    walk("", table)
    for key in flat:
        if key not in _KNOWN_KEYS and not (key.startswith("options.") and len(key) > len("options.")):
            raise AllowListError(f"{source}: {section}.{key} is not a run-config key; use one of "
                                 f"{', '.join(sorted(_KNOWN_KEYS))} or options.<name>")
    return flat


def _is_bounds_spec(value: Mapping[str, Any]) -> bool:
    return bool(value) and set(value) <= {"min", "max"}


def _bounds(key: str, spec: Any, source: str) -> Bounds:
    if not isinstance(spec, Mapping) or not _is_bounds_spec(spec) or \
            not all(_is_number(v) for v in spec.values()):
        raise AllowListError(f"{source}: ranges.{key} must look like {{ min = 1, max = 10 }} "
                             "(either bound may be left out)")
    bounds = Bounds(float(spec.get("min", -math.inf)), float(spec.get("max", math.inf)))
    if bounds.low > bounds.high:
        raise AllowListError(f"{source}: ranges.{key} has min > max")
    return bounds


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(actual: Any, expected: Any) -> bool:
    if _is_number(actual) and _is_number(expected):
        return math.isclose(float(actual), float(expected), rel_tol=1e-12, abs_tol=0.0)
    return type(actual) is type(expected) and actual == expected
