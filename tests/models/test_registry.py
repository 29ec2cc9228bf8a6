"""The recipe registry: names resolve, and every registered recipe honours the Recipe contract."""

from __future__ import annotations

import pytest
import torch

from medgen.config import ConfigError, RunConfig
from medgen.models.recipe import Recipe, RecipeOptions
from medgen.models.registry import RECIPES, build_recipe, recipe_class


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


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


def _outside(bounds, default):
    """A value each declared bound refuses (one per end / the choices)."""
    if bounds.choices is not None:
        return ["not-a-choice"]
    step = 1 if isinstance(default, int) else 1e-3
    out = []
    if bounds.at_least is not None:
        out.append(type(default)(bounds.at_least - step))
    if bounds.above is not None:
        out.append(type(default)(bounds.above))
    if bounds.at_most is not None:
        out.append(type(default)(bounds.at_most + step))
    if bounds.below is not None:
        out.append(type(default)(bounds.below))
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_declared_option_bounds_hold_the_defaults_and_refuse_naming_the_option(name):
    options = recipe_class(name).Options
    declared = options.bounds()
    assert declared, f"{name} declares no option bounds"
    defaults = options()
    for key, bounds in declared.items():
        default = getattr(defaults, key.replace("-", "_"))
        assert bounds.admits(default), f"{name}: the default of options.{key} is out of its bounds"
        values = _outside(bounds, default)
        assert values, f"{name}: options.{key} declares an empty bound"
        for value in values:
            with pytest.raises(ConfigError, match=f"options\\.{key} must be"):
                build_recipe(RunConfig(recipe=name, options={key: value}))


@pytest.mark.parametrize("key,value", [("lr-gen", float("nan")), ("gen-width", 2.5),
                                       ("moment-release", 1), ("loss", 3)])
def test_option_types_are_checked_before_their_bounds(key, value):
    with pytest.raises(ConfigError, match=f"options\\.{key}'? must be"):  # (RunConfig refuses a NaN first)
        build_recipe(RunConfig(options={key: value}))
