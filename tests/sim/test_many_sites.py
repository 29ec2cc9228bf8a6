"""A federation of many simulated hospitals: names past Z (AA..ZZ), physics for every one,
a deterministic many-site build, and the default builds unchanged.

Mutations caught: names past Z restarting at A or repeating (distinct-names test); physics
taken from the list position instead of the name (the "C in any build" test); a
non-deterministic many-site render (two builds differ); any change to what the default
options produce (the pinned hashes were computed from the code BEFORE many-site naming,
commit a66e8b5, with the same calls)."""

from __future__ import annotations

import string

import pytest

from medgen.sim.config import MAX_SITES, SimConfig, SimConfigError, site_index, site_name
from medgen.sim.federation import build_federation

# SimConfig().config_hash() and the content hash of TINY's build at a66e8b5 (before this change)
DEFAULT_CONFIG_HASH = "a2f4f2aa5902383d196ab0b5460d096b788cf9c9a370d80a8e25a9a91be8bb3a"
TINY = dict(subjects_per_site=2, public_size=1, heldout_fit=1, heldout_test=1, image_size=32, quantity_skew=0.5)
TINY_CONTENT_HASH = "3c048db0a0c859b36cb33f9cfced60f55ec94a7c0124733f86ffdc84cb75743f"


def test_a_hundred_sites_have_distinct_names_past_z():
    names = SimConfig(sites="100").site_names
    assert names[:26] == tuple(string.ascii_uppercase)
    assert names[26:29] == ("AA", "AB", "AC") and names[-1] == "CV" and len(set(names)) == 100
    assert all(site_index(site_name(i)) == i for i in range(MAX_SITES))
    assert SimConfig(sites="A,AA,CV").site_names == ("A", "AA", "CV")


@pytest.mark.parametrize("sites", ["A1", "AAA", "a", str(MAX_SITES + 1), "0"])
def test_bad_site_names_are_refused(sites):
    with pytest.raises(SimConfigError, match="sites"):
        SimConfig(sites=sites).site_names


def test_every_site_of_a_hundred_has_its_own_scanner():
    physics = SimConfig(sites="100").physics()
    signatures = {(p.kind, round(p.severity, 9)) for p in physics.values()}
    assert len(signatures) == 100  # no two simulated hospitals share a scanner
    assert all(0.0 <= p.severity <= 1.0 for p in physics.values())
    # a site's physics follow its name, not its position in the list
    assert SimConfig(sites="C,AA").physics()["C"].to_dict() == physics["C"].to_dict()
    assert SimConfig(sites="C,AA").physics()["AA"].to_dict() == physics["AA"].to_dict()


def test_default_config_hash_unchanged():
    assert SimConfig().config_hash() == DEFAULT_CONFIG_HASH
    assert SimConfig(sites="26").site_names == tuple(string.ascii_uppercase)


@pytest.mark.slow
def test_many_site_build_is_deterministic(tmp_path):
    config = SimConfig(sites="28", subjects_per_site=1, public_size=0, heldout_fit=0, heldout_test=0,
                       image_size=32, quantity_skew=0.1)
    first = build_federation(config, tmp_path / "one", workers=1)
    second = build_federation(config, tmp_path / "two", workers=2)
    assert first.content_hash == second.content_hash
    assert first.site_names[-2:] == ("AA", "AB") and (tmp_path / "one" / "sites" / "AB" / "images").is_dir()
    assert first.data["sites"]["AB"]["kind"] == config.physics()["AB"].kind


@pytest.mark.slow
def test_default_sites_build_byte_identical_to_before(tmp_path):
    manifest = build_federation(SimConfig(**TINY), tmp_path / "tiny", workers=1)
    assert manifest.content_hash == TINY_CONTENT_HASH
