"""LabelSchema: stored values <-> class indices, and refusal of values outside it."""

import numpy as np
import pytest

from medgen.data import LabelSchema, LabelValueError


def test_values_map_to_indices_and_back():
    schema = LabelSchema(("air", "soft_tissue", "bone"), (0, 10, 200))
    stored = np.array([[0, 10], [200, 10]], np.uint8)
    indices = schema.to_indices(stored, "x.nii.gz")
    assert indices.dtype == np.int64 and indices.tolist() == [[0, 1], [2, 1]]
    assert schema.to_values(indices).tolist() == stored.tolist()
    assert schema.num_classes == 3 and schema.index("bone") == 2


def test_value_outside_schema_names_file_and_value():
    schema = LabelSchema.from_names(("background", "csf", "gm", "wm"))
    with pytest.raises(LabelValueError) as err:
        schema.to_indices(np.array([0, 1, 7, 3, 9]), "sites/A/labels/s01.nii.gz")
    message = str(err.value)
    assert "sites/A/labels/s01.nii.gz" in message and "7, 9" in message
    assert "0 background, 1 csf, 2 gm, 3 wm" in message and "dataset.toml" in message


def test_non_integer_label_map_is_refused():
    schema = LabelSchema.from_names(("a", "b"))
    with pytest.raises(LabelValueError, match="y.nii.gz holds non-integer"):
        schema.to_indices(np.array([0.0, 0.5]), "y.nii.gz")
    assert schema.to_indices(np.array([0.0, 1.0]), "y").tolist() == [0, 1]


@pytest.mark.parametrize("names, values, words", [
    (("a",), (0,), "at least 2"),
    (("a", "a"), (0, 1), "more than once"),
    (("a", "b"), (1, 1), "more than once"),
    (("a", "Bad Name"), (0, 1), "lower-case identifier"),
    (("a", "b"), (0, 70000), "0..65535"),
])
def test_invalid_schemas_are_refused(names, values, words):
    with pytest.raises(ValueError, match=words):
        LabelSchema(names, values)
