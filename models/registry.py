"""Recipes by name: the extension point. Adding a method = one file + one line here."""

from __future__ import annotations

import importlib

from medgen.config import ConfigError, RunConfig
from medgen.models.recipe import Recipe

# name -> "module:Class"; imported lazily so a recipe's heavy imports cost only its users
RECIPES: dict[str, str] = {
    "dp-cgan": "medgen.models.dp_cgan:DPConditionalGAN",
    "cddpm": "medgen.models.cddpm:ConditionalDDPM",
    "bridge-translate": "medgen.models.bridge_translate:BridgeTranslator",
    "site-gan": "medgen.models.site_gan:SiteConditionalGAN",  # needs no label maps
    "restore-diffusion": "medgen.models.restore_diffusion:RestoreDiffusion",  # needs no label maps
    "volume-gan": "medgen.models.volume_gan:VolumeConsistentGAN",  # 3D volumes, no label maps
    "spcycle-gan": "medgen.models.spcycle_gan:SPCycleGAN",  # site-to-site translation, G and D private
    "style-content-ct": "medgen.models.style_content_ct:StyleContentCT",  # CT content x style (AdaIN), no label maps
    "da-gan": "medgen.models.da_gan:DAGan",  # MR->CT from misaligned pairs at paired CT sites; G, R, D private
    "red-gan": "medgen.models.red_gan:RedGAN",  # dp-cgan + passive segmenter, rare-class rebalancing
    "two-stage": "medgen.models.two_stage:TwoStageGAN",  # label-map GAN + dp-cgan, critics private
    "icycle-gan": "medgen.models.icycle_gan:ICycleGAN",  # translation + correction net, G, R, D private
    "blind-denoise": "medgen.models.blind_denoise:BlindDenoise",  # noise GAN + denoiser, no label maps
}


def recipe_class(name: str) -> type[Recipe]:
    try:
        target = RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe '{name}'; available: {', '.join(sorted(RECIPES))}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_recipe(config: RunConfig) -> Recipe:
    return recipe_class(config.recipe)(config)
