import pytest
import torch


@pytest.fixture(scope="session")
def anatomy_32():
    """The real MNI anatomy on the render grid of 32 px images (loaded once per session)."""
    from medgen.sim.anatomy import FOV_MM, load_anatomy
    from medgen.sim.subjects import render_grid

    torch.set_num_threads(1)
    return load_anatomy(render_grid(32, FOV_MM))


@pytest.fixture(scope="session")
def tiny_config():
    from medgen.sim.config import SimConfig

    return SimConfig(seed=3, sites="A,B,C,D", subjects_per_site=2, public_size=3, heldout_fit=2,
                     heldout_test=2, image_size=32)


@pytest.fixture(scope="session")
def built(tiny_config, tmp_path_factory):
    """One tiny federation (32 px, 4 sites x 2 subjects) shared by the test files."""
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    return build_federation(tiny_config, tmp_path_factory.mktemp("fed") / "data")
