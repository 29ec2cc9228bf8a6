"""The label schema flows from the run config (``label-names``) into every recipe: the
label-input channels, the per-class tables and the one-off release vectors are sized from
the class count, for the brain's 4 classes and the head's 7 in one test run; what a recipe
consumes is declared and an unlabelled site is refused by a recipe that needs labels."""

from __future__ import annotations

import types

import pytest
import torch

from medgen.config import ConfigError, RunConfig
from medgen.models.capabilities import CONSUMES, SiteDataRefused
from medgen.models.registry import RECIPES, build_recipe, recipe_class
from medgen.models.scanner_moments import moment_dim, patient_moments
from medgen.models.site_style import style_stat_dim

BRAIN = "background,csf,gm,wm"
HEAD = "air,soft_tissue,fat,bone,csf,gm,wm"
SMALL = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config(recipe: str, label_names: str, options=None) -> RunConfig:
    return RunConfig(recipe=recipe, image_size=32, sites="A,B", label_names=label_names,
                     options=dict(options or {}))


def test_label_names_is_a_run_config_key_with_the_brain_default():
    config = RunConfig()
    assert config.class_names == ("background", "csf", "gm", "wm") and config.num_classes == 4
    flat = RunConfig(label_names=HEAD).to_run_config()
    assert flat["label-names"] == HEAD
    assert RunConfig.from_run_config(flat).num_classes == 7
    with pytest.raises(ConfigError, match="label-names"):
        RunConfig(label_names="air,air")
    with pytest.raises(ConfigError, match="label-names"):
        RunConfig(label_names="only")


@pytest.mark.parametrize("label_names,k", [(BRAIN, 4), (HEAD, 7)])
def test_dp_cgan_channels_and_release_follow_the_class_count(label_names, k):
    recipe = build_recipe(_config("dp-cgan", label_names, SMALL))
    model = recipe.build()
    assert recipe.num_classes == k and recipe.label_names == tuple(label_names.split(","))
    assert model.disc.stages[0].conv.in_channels == 1 + k  # image + one channel per class
    assert model.gen.head.class_offset.weight.shape == (2, k)
    assert model.gen.site_moments.shape == (2, moment_dim(k)) == (2, 3 * k + 3)
    labels = torch.randint(0, k, (3, 32, 32))
    fake = recipe.sample(model, labels, 1, generator=torch.Generator().manual_seed(0))
    assert fake.shape == (3, 1, 32, 32)
    assert patient_moments(fake, labels, k).shape == (3, moment_dim(k))
    with pytest.raises(ValueError, match=f"0..{k - 1}"):
        recipe.sample(model, torch.full((1, 32, 32), k), 0)


@pytest.mark.parametrize("label_names,k", [(BRAIN, 4), (HEAD, 7)])
def test_cddpm_denoiser_input_channels_follow_the_class_count(label_names, k):
    recipe = build_recipe(_config("cddpm", label_names, {"channels": "8,16", "norm-groups": 4,
                                                          "res-blocks": 1}))
    model = recipe.build()
    unet = model.denoiser.unet if hasattr(model.denoiser, "unet") else model.denoiser
    assert unet.conv_in.conv.in_channels == 1 + k
    if hasattr(model.denoiser, "tissue_offset"):
        assert model.denoiser.tissue_offset.weight.shape == (2, k)
        assert model.denoiser.site_moments.shape == (2, moment_dim(k))


@pytest.mark.parametrize("label_names,k", [(BRAIN, 4), (HEAD, 7)])
def test_bridge_segmenter_and_style_release_follow_the_class_count(label_names, k):
    recipe = build_recipe(_config("bridge-translate", label_names, {**SMALL, "seg-steps-per-round": 1}))
    model = recipe.build()
    assert model.style_release.shape == (2, style_stat_dim(k)) == (2, 2 * k + 2)
    logits = model.seg(torch.zeros(1, 1, 32, 32))
    assert logits.shape == (1, k, 32, 32)


def test_the_brain_default_is_unchanged_by_the_schema_key():
    """Same weights, same shapes as before the key existed: the default schema is the brain's."""
    explicit = build_recipe(_config("dp-cgan", BRAIN, SMALL)).build().state_dict()
    default = build_recipe(RunConfig(recipe="dp-cgan", image_size=32, sites="A,B",
                                     options=SMALL)).build().state_dict()
    assert explicit.keys() == default.keys()
    assert all(torch.equal(explicit[key], default[key]) for key in explicit)


def test_every_recipe_declares_what_it_consumes():
    for name in RECIPES:
        cls = recipe_class(name)
        assert cls.consumes in CONSUMES and isinstance(cls.requires_labels, bool), name
    assert recipe_class("site-gan").requires_labels is False
    assert {n for n in RECIPES if recipe_class(n).requires_labels} >= {"dp-cgan", "cddpm", "bridge-translate"}


def test_a_recipe_that_needs_labels_refuses_an_unlabelled_site_and_site_gan_does_not():
    unlabelled = types.SimpleNamespace(has_labels=False)
    with pytest.raises(SiteDataRefused, match="dp-cgan.*no labels"):
        build_recipe(_config("dp-cgan", BRAIN, SMALL)).check_site(unlabelled)
    build_recipe(_config("dp-cgan", BRAIN, SMALL)).check_site(types.SimpleNamespace(has_labels=True))
    build_recipe(_config("site-gan", HEAD)).check_site(unlabelled)
    with pytest.raises(SiteDataRefused, match="consumes slices"):
        build_recipe(_config("site-gan", HEAD)).check_site(types.SimpleNamespace(consumes="volumes"))


def test_a_site_whose_schema_differs_from_the_runs_label_names_is_refused():
    head_site = types.SimpleNamespace(has_labels=True, dims=2,
                                      schema=types.SimpleNamespace(names=tuple(HEAD.split(","))))
    with pytest.raises(SiteDataRefused, match="4 classes.*declares 7"):
        build_recipe(_config("dp-cgan", BRAIN, SMALL)).check_site(head_site)
    build_recipe(_config("dp-cgan", HEAD, SMALL)).check_site(head_site)
    with pytest.raises(SiteDataRefused, match="consumes slices.*serves volumes"):
        build_recipe(_config("dp-cgan", HEAD, SMALL)).check_site(
            types.SimpleNamespace(has_labels=True, dims=3, schema=None))
