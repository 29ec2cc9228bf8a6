"""LabelSchema: which classes a dataset's label maps hold, by name and stored value.

A label map stores integer values; a recipe, segmenter or evaluator works with class
indices 0..K-1 in schema order. The schema is the one place that maps one to the other,
so the number and names of classes come from the data (dataset.toml [labels]), never
from a constant. A stored value outside the schema is an error that names the file and
the value: silently mapping it to background would train on wrong anatomy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medgen.data.errors import LabelValueError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
"""Class names are lower-case identifiers: they become metric keys and file names."""
MAX_LABEL_VALUE = 65535


@dataclass(frozen=True)
class LabelSchema:
    """Class names in index order and the value each is stored as in label files."""

    names: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        names = tuple(str(name) for name in self.names)
        values = tuple(int(value) for value in self.values)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "values", values)
        if len(names) < 2:
            raise ValueError(f"a label schema needs at least 2 classes, got {list(names)}")
        if len(values) != len(names):
            raise ValueError(f"{len(names)} class names but {len(values)} values; give one "
                             "value per name (or leave values out for 0..K-1)")
        for name in names:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"class name '{name}' must be a lower-case identifier "
                                 "(letters, digits, '_'; e.g. 'soft_tissue')")
        for kind, items in (("name", names), ("value", values)):
            repeated = sorted({str(item) for item in items if items.count(item) > 1})
            if repeated:
                raise ValueError(f"class {kind}(s) {', '.join(repeated)} appear more than once")
        for value in values:
            if not 0 <= value <= MAX_LABEL_VALUE:
                raise ValueError(f"label value {value} must be in 0..{MAX_LABEL_VALUE}")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "LabelSchema":
        """Values 0..K-1 in the order of ``names`` (the common case)."""
        return cls(tuple(names), tuple(range(len(names))))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LabelSchema":
        names = tuple(data["names"])
        values = data.get("values")
        return cls(names, tuple(values) if values is not None else tuple(range(len(names))))

    def with_class(self, name: str) -> "LabelSchema":
        """This schema plus class ``name`` last, stored as the next free value (e.g. a
        simulator's optional lesion class over the brain's four)."""
        return LabelSchema(self.names + (name,), self.values + (max(self.values) + 1,))

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "values": list(self.values)}

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Class index of ``name`` (ValueError listing the classes if it is not one)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"'{name}' is not a class of this schema; classes: "
                             f"{', '.join(self.names)}") from None

    def to_indices(self, labels: np.ndarray, source: str) -> np.ndarray:
        """Stored label values -> class indices (int64), refusing values outside the schema.

        ``source`` names the file in the error, e.g. 'sites/A/labels/s01.nii.gz'.
        """
        array = np.asarray(labels)
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                bad = array[~np.isfinite(array) | (array != np.round(array))]
                raise LabelValueError(
                    f"{source} holds non-integer label values (e.g. {float(bad.flat[0]):g}): "
                    "a label map must store whole numbers; re-export it as integers")
            array = array.astype(np.int64)
        elif array.dtype.kind not in "iub":
            raise LabelValueError(f"{source} has dtype {array.dtype}, not an integer label map")
        order = np.argsort(self.values)
        sorted_values = np.asarray(self.values, np.int64)[order]
        flat = array.astype(np.int64).ravel()
        position = np.clip(np.searchsorted(sorted_values, flat), 0, len(sorted_values) - 1)
        known = sorted_values[position] == flat
        if not known.all():
            unknown = np.unique(flat[~known])
            shown = ", ".join(str(int(v)) for v in unknown[:8]) + (" ..." if unknown.size > 8 else "")
            raise LabelValueError(
                f"{source} holds label value(s) {shown} outside the label schema "
                f"({self.describe()}); fix the file, or declare the class in dataset.toml "
                "[labels] (names and values)")
        return order[position].reshape(array.shape).astype(np.int64)

    def to_values(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> stored values (uint8 when every value fits, else uint16)."""
        lookup = np.asarray(self.values, np.uint8 if max(self.values) <= 255 else np.uint16)
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_classes):
            raise ValueError(f"class indices must be in 0..{self.num_classes - 1}")
        return lookup[indices]

    def describe(self) -> str:
        """'0 background, 1 csf, ...': how the schema reads in messages and docs."""
        return ", ".join(f"{value} {name}" for name, value in zip(self.names, self.values))
