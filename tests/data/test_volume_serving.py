"""Volumes are served to a recipe that declares them (issue 14 item 4): what a recipe
``consumes`` decides what ``load_site`` serves; the patient stays the item (the unit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader

from medgen.config import RunConfig
from medgen.data.manifest import DatasetManifest, IntensityPolicy
from medgen.data.patient_dataset import PatientDataset
from medgen.data.site_data import SERVED_DIMS, load_site
from medgen.models.capabilities import CONSUMES, SiteDataRefused
from medgen.models.registry import build_recipe

SIZE, DEPTH, SLICES = 16, 8, 12


def _volume_site(root: Path, files, patients: int = 3, flat: int = 0) -> Path:
    """MR volumes of SLICES slices (slice k brighter with k), plus ``flat`` 2D images."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        volume = np.stack([(k + 1) * (50 + 20 * rng.random((20, 20))) for k in range(SLICES)], -1)
        files.write_nifti(root / "images" / f"v{p}.nii.gz", volume.astype(np.float32))
    for p in range(flat):
        files.write_nifti(root / "images" / f"flat{p}.nii.gz", files.phantom(20, seed=p)[0])
    DatasetManifest(modality="MR", intensity=IntensityPolicy(), labels=None, dims=3).write(root)
    return root


def test_served_dims_cover_every_consumes_value():
    assert set(SERVED_DIMS) == set(CONSUMES)


def test_volume_recipe_gets_patient_volumes_of_its_depth_as_poisson_batches(tmp_path, files):
    site = _volume_site(tmp_path / "s", files)
    data = load_site(site, SIZE, consumes="volumes", depth=DEPTH)
    assert data.dims == 3 and data.images.shape == (3, 1, DEPTH, SIZE, SIZE) and data.num_patients == 3
    # through-plane order survives the resampling: slice brightness rises with depth
    means = data.images[0, 0].mean(dim=(1, 2))
    assert bool((means[1:] > means[:-1]).all())
    recipe = build_recipe(RunConfig(recipe="volume-gan", image_size=SIZE, sites="A,B",
                                    options={"depth": DEPTH}))
    recipe.check_site(data)  # accepted: it consumes volumes
    dataset = PatientDataset(data, generator_seed=0)
    assert len(dataset) == 3 and dataset[1][0].shape == (1, DEPTH, SIZE, SIZE)
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(dataset, batch_size=2),
                                           generator=torch.Generator().manual_seed(0))
    batches = [batch[0] for _ in range(20) for batch in loader]  # seeded: deterministic
    assert {tuple(b.shape[1:]) for b in batches} == {(1, DEPTH, SIZE, SIZE)}
    assert any(b.shape[0] == 0 for b in batches)  # an empty Poisson batch keeps the shape
    assert recipe.real_volumes(next(iter(loader)), torch.device("cpu")).shape[1:] == (1, DEPTH, SIZE, SIZE)


def test_slice_recipe_gets_slices_of_the_same_volume_site(tmp_path, files):
    site = _volume_site(tmp_path / "s", files)
    slice_recipe = build_recipe(RunConfig(recipe="site-gan", image_size=SIZE, sites="A,B"))
    as_manifest = load_site(site, SIZE)  # dims = 3 in dataset.toml
    with pytest.raises(SiteDataRefused, match="consumes slices"):
        slice_recipe.check_site(as_manifest)
    data = load_site(site, SIZE, consumes=slice_recipe.consumes)
    slice_recipe.check_site(data)
    assert data.dims == 2 and data.num_patients == 3 and data.images.shape[1:] == (1, SIZE, SIZE)
    assert data.images.shape[0] == 3 * SLICES
    image, _ = PatientDataset(data, generator_seed=0)[2]
    assert image.shape == (1, SIZE, SIZE)
    volume_recipe = build_recipe(RunConfig(recipe="volume-gan", image_size=SIZE, sites="A,B"))
    with pytest.raises(SiteDataRefused, match="consumes volumes"):
        volume_recipe.check_site(data)


def test_a_2d_image_is_never_stretched_into_a_volume(tmp_path, files):
    site = _volume_site(tmp_path / "s", files, patients=1, flat=2)
    data = load_site(site, SIZE, consumes="volumes", depth=DEPTH)
    assert data.num_patients == 1 and data.images.shape[0] == 1
    reasons = sorted(s.reason for s in data.skipped)
    assert len(reasons) == 2 and all("single 2D slice" in r for r in reasons)
    assert reasons[0].startswith("images/flat0.nii.gz")


def test_consumes_and_a_contradicting_dims_are_refused(tmp_path, files):
    site = _volume_site(tmp_path / "s", files, patients=1)
    with pytest.raises(ValueError, match="decides dims"):
        load_site(site, SIZE, consumes="volumes", dims=2)
    with pytest.raises(ValueError, match="consumes is one of"):
        load_site(site, SIZE, consumes="patches")
