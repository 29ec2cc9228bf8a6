import numpy as np

from medgen.sim.subjects import area_pool, deform_subject, tissue_labels


def test_labels_are_argmax_of_the_deformed_maps(anatomy_32):
    subject = deform_subject(anatomy_32, seed=123, image_size=32)
    pooled = area_pool(subject.maps, 32)
    background = np.clip(1 - pooled[1:].sum(axis=0), 0, 1)
    expected = np.argmax(np.concatenate([background[None], pooled[1:]]), axis=0)
    np.testing.assert_array_equal(subject.labels, expected)
    assert subject.labels.dtype == np.uint8 and subject.labels.shape == (32, 32)
    assert set(np.unique(subject.labels)) == {0, 1, 2, 3}


def test_same_seed_same_subject_other_seed_other_anatomy(anatomy_32):
    a = deform_subject(anatomy_32, seed=7, image_size=32)
    b = deform_subject(anatomy_32, seed=7, image_size=32)
    c = deform_subject(anatomy_32, seed=8, image_size=32)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert a.level == b.level
    assert (a.labels != c.labels).mean() > 0.02


def test_deformation_is_smooth_not_a_shuffle(anatomy_32):
    # a deformed subject of the same level overlaps its template far better than chance
    subject = deform_subject(anatomy_32, seed=11, image_size=32)
    level = anatomy_32.levels.index(subject.level)
    template = tissue_labels(area_pool(anatomy_32.maps[level], 32))
    brain_t, brain_s = template > 0, subject.labels > 0
    dice = 2 * (brain_t & brain_s).sum() / (brain_t.sum() + brain_s.sum())
    assert dice > 0.8


def test_area_pool_is_a_block_mean():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(area_pool(image, 2), [[2.5, 4.5], [10.5, 12.5]])
