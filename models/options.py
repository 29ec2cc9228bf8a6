"""A recipe's own options (``options.<name>`` keys of the run config), with declared bounds.

Each option is a typed dataclass field; its range is declared next to it:

    lr: float = option(2e-3, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    loss: str = option("nonsat", choices=("nonsat", "hinge"))

``RecipeOptions`` checks the type and the declared range of every field when the options
are made, and refuses with a ``ConfigError`` naming ``options.<key>``: a wrong value fails
when the run is configured, not rounds later inside training. A recipe adds only the
checks that relate two options (``__post_init__`` calling ``super().__post_init__()``).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Mapping

from medgen.config import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The allowed values of one option: a numeric range (ends open or closed) or a set."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: tuple[Any, ...] | None = None

    def admits(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return ((self.at_least is None or value >= self.at_least)
                and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most)
                and (self.below is None or value < self.below))

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {self.choices}"
        parts = [f"{op} {_number(v)}" for op, v in ((">=", self.at_least), (">", self.above),
                                                     ("<=", self.at_most), ("<", self.below))
                 if v is not None]
        return " and ".join(parts)


def option(default: Any, **bounds: Any) -> Any:
    """A recipe option's dataclass field with its declared ``Bounds`` (keyword arguments)."""
    if "choices" in bounds:
        bounds["choices"] = tuple(bounds["choices"])
    return field(default=default, metadata={"bounds": Bounds(**bounds)})


def option_key(name: str) -> str:
    """The run-config spelling of a field name: ``lr_gen`` -> ``lr-gen``."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class RecipeOptions:
    """Base for a recipe's options; subclasses declare fields with ``option(...)``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _checked_type(f, getattr(self, f.name))
            bounds: Bounds | None = f.metadata.get("bounds")
            if bounds is not None and not bounds.admits(value):
                kind = "an integer " if _kind(f) is int and bounds.choices is None else ""
                raise ConfigError(f"options.{option_key(f.name)} must be {kind}{bounds.describe()}, "
                                  f"got {value!r}")

    @classmethod
    def from_mapping(cls, recipe: str, values: Mapping[str, Any]) -> "RecipeOptions":
        known = {option_key(f.name): f for f in fields(cls)}
        parsed = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"recipe '{recipe}' has no option '{key}'; "
                                  f"its options: {', '.join(sorted(known)) or '(none)'}")
            if _kind(known[key]) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # TOML writes 1 for 1.0
            parsed[known[key].name] = value
        return cls(**parsed)

    @classmethod
    def bounds(cls) -> dict[str, Bounds]:
        """Every declared range, by run-config key (for documentation and tests)."""
        return {option_key(f.name): f.metadata["bounds"] for f in fields(cls) if "bounds" in f.metadata}


def _kind(f: Field) -> type | None:
    """The option's type, from its default (options always have one)."""
    default = f.default if f.default is not MISSING else None
    return type(default) if isinstance(default, (bool, int, float, str)) else None


def _checked_type(f: Field, value: Any) -> Any:
    kind, key = _kind(f), option_key(f.name)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"options.{key} must be true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"options.{key} must be a string, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"options.{key} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):
        raise ConfigError(f"options.{key} must be a finite number, got {value!r}")
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
