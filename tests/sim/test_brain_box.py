import numpy as np
import pytest

from medgen.sim.brain_box import brain_box


def test_brain_box_covers_the_brain_plus_a_margin():
    labels = np.zeros((16, 16), np.uint8)
    labels[6:10, 5:9] = 2
    mask = brain_box(labels, dilation=2)
    assert mask.dtype == bool
    assert mask[labels > 0].all()
    assert mask[4, 3] and mask[11, 10]  # 2 px around the brain
    assert not mask[3, 5] and not mask[6, 2] and not mask[0, 0]
    assert (brain_box(labels, dilation=0) == (labels > 0)).all()


def test_batch_maps_are_dilated_independently():
    labels = np.zeros((2, 8, 8), np.int64)
    labels[0, 4, 4] = 1
    mask = brain_box(labels, dilation=1)
    assert mask[0].sum() == 9 and mask[1].sum() == 0


def test_rejects_non_integer_maps():
    with pytest.raises(ValueError, match="integer"):
        brain_box(np.zeros((4, 4), np.float32))
