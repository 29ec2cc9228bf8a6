import numpy as np
import pytest

from medgen.sim import anatomy as anatomy_module


def test_stack_is_t1_plus_tissue_probabilities(anatomy_32):
    maps = anatomy_32.maps
    assert maps.ndim == 4 and maps.shape[1] == 4 and maps.shape[2] == maps.shape[3] == anatomy_32.grid
    assert 60 <= len(anatomy_32.levels) <= 100  # "about 70 usable levels"
    tissue_sum = maps[:, 1:].sum(axis=1)
    assert tissue_sum.max() <= 1.0 + 1e-3  # CSF + GM + WM is a partition of the brain
    inside = tissue_sum > 0.99
    assert inside.mean() > 0.2  # the FOV is the brain box, not mostly background
    # the real T1 contrast: WM brighter than GM brighter than CSF
    csf, gm, wm = anatomy_32.tissue_t1
    assert csf < gm < wm


def test_missing_template_names_path_and_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(anatomy_module, "template_dir", lambda: tmp_path)
    with pytest.raises(anatomy_module.AnatomyMissingError) as err:
        anatomy_module.template_paths()
    assert str(tmp_path) in str(err.value) and "nilearn==0.13.1" in str(err.value)


def test_brain_is_inside_the_field_of_view(anatomy_32):
    # the fixed FOV must hold every level's brain with a margin for the deformations
    brain = anatomy_32.maps[:, 1:].sum(axis=1) > 0.5
    rows = np.flatnonzero(brain.any(axis=(0, 2)))
    assert rows.min() > 0 and rows.max() < anatomy_32.grid - 1
