"""Errors of medgen.data: each message names the file (and key or value) and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Data that medgen cannot use as declared; the message says where and what to do."""


class ManifestError(DataError):
    """A dataset.toml is missing a key, has an unknown one, or a value out of range."""


class LabelValueError(DataError):
    """A label map holds a value outside the dataset's label schema."""


class RemapError(DataError):
    """A public-bank remap table is incomplete or points at a class the schema lacks."""
