"""The recipe registry: names resolve, and every registered recipe honours the Recipe contract."""

from __future__ import annotations

import pytest
import torch

from medgen.config import ConfigError, RunConfig
from medgen.models.recipe import Recipe, RecipeOptions
from medgen.models.registry import RECIPES, build_recipe, recipe_class


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_dp_cgan_is_registered_under_its_name():
    cls = recipe_class("dp-cgan")
    assert cls.__name__ == "DPConditionalGAN" and cls.name == "dp-cgan"
    assert isinstance(build_recipe(RunConfig(recipe="dp-cgan", image_size=32)), cls)


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*dp-cgan"):
        recipe_class("nope")


def test_unknown_or_bad_recipe_option_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="no option 'gen-widht'"):
        build_recipe(RunConfig(options={"gen-widht": 8}))
    with pytest.raises(ConfigError, match="options.loss"):
        build_recipe(RunConfig(options={"loss": "wasserstein"}))
    with pytest.raises(ConfigError, match="options.disc-steps-per-gen-step"):
        build_recipe(RunConfig(options={"disc-steps-per-gen-step": 0}))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_honours_the_contract(name):
    cls = recipe_class(name)
    assert issubclass(cls, Recipe) and cls.name == name
    assert issubclass(cls.Options, RecipeOptions)
    recipe = build_recipe(RunConfig(recipe=name, image_size=32, sites="A,B"))
    model = recipe.build()
    submodules = dict(model.named_modules())
    # the modules declared private exist and own parameters (DP-SGD applies to them)
    assert recipe.private_modules, "a recipe must say which networks see real images"
    for private in recipe.private_modules:
        assert private in submodules and any(True for _ in submodules[private].parameters())
    shared = recipe.shared_keys(model)
    assert shared and set(shared) <= set(model.state_dict())
    assert set(shared) | set(recipe.local_only_state(model)) == set(model.state_dict())
    labels = torch.randint(0, 4, (2, 32, 32))
    images = recipe.sample(model, labels, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
