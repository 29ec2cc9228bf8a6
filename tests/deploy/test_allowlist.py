"""The hospital's allow-list: parsing, every kind of refusal, and the ClientApp refusing a run
at the node without training (no ledger, no stored reply, data untouched)."""

from __future__ import annotations

import hashlib

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import medgen
from medgen.config import RunConfig
from medgen.deploy.allowlist import (NOT_ALLOWED, AllowList, AllowListError, NotAllowed,
                                     enforce_node_allow_list)

VERSION = medgen.__version__
ALLOW = f"""
medgen-version = "{VERSION}"
recipes = ["dp-cgan"]
[fixed]
accountant = "rdp"
[ranges]
num-rounds = {{ max = 5 }}
local-steps = {{ min = 1, max = 4 }}
[ranges.options]
gen-width = {{ max = 8 }}
[choices]
device = ["auto", "cpu"]
"""
OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}


def _allowed_config(**changes) -> RunConfig:
    base = RunConfig(num_rounds=2, local_steps=2, batch_size=2, image_size=32, sites="A,B",
                     accountant="rdp", eval_every=0, target_epsilon=5.0, options=OPTIONS)
    return base.replace(**changes)


@pytest.fixture
def allow_file(tmp_path):
    path = tmp_path / "allow.toml"
    path.write_text(ALLOW)
    return path


def test_a_run_inside_every_rule_is_allowed(allow_file):
    allow = AllowList.load(allow_file)
    assert allow.ranges["options.gen-width"].high == 8  # nested [ranges.options] flattens
    assert allow.violations(_allowed_config(), VERSION, VERSION) == []
    assert allow.violations(_allowed_config(), VERSION, None) == []   # coordinator silent: no check


@pytest.mark.parametrize("changes, key", [
    ({"recipe": "some-other-recipe"}, "recipe 'some-other-recipe'"),
    ({"accountant": "prv"}, "accountant"),
    ({"num_rounds": 6}, "num-rounds"),
    ({"local_steps": 5}, "local-steps"),
    ({"options": {**OPTIONS, "gen-width": 16}}, "options.gen-width"),
    ({"device": "cuda"}, "device"),
])
def test_each_rule_refuses_what_it_does_not_allow(allow_file, changes, key):
    allow = AllowList.load(allow_file)
    found = allow.violations(_allowed_config(**changes), VERSION)
    assert len(found) == 1 and key in found[0], found
    with pytest.raises(NotAllowed, match="allow-list"):
        allow.check(_allowed_config(**changes), VERSION)


def test_boundaries_are_inclusive(allow_file):
    allow = AllowList.load(allow_file)
    assert allow.violations(_allowed_config(num_rounds=5, local_steps=4,
                                            options={**OPTIONS, "gen-width": 8}), VERSION) == []


def test_versions_must_match_the_approved_and_the_coordinators(allow_file):
    allow = AllowList.load(allow_file)
    found = allow.violations(_allowed_config(), "9.9.9")
    assert any("approved release" in f and "9.9.9" in f for f in found), found
    found = allow.violations(_allowed_config(), VERSION, "0.0.1")
    assert found == [f"the coordinator runs medgen 0.0.1, this hospital {VERSION}"]


def test_options_the_run_does_not_set_are_not_checked(allow_file):
    config = _allowed_config(options={k: v for k, v in OPTIONS.items() if k != "gen-width"})
    assert AllowList.load(allow_file).violations(config, VERSION) == []


@pytest.mark.parametrize("text, field", [
    ('recipes = ["dp-cgan"]', "medgen-version"),
    (f'medgen-version = "{VERSION}"', "recipes"),
    (f'medgen-version = "{VERSION}"\nrecipes = ["dp-cgan"]\nfoo = 1', "foo"),
    (f'medgen-version = "{VERSION}"\nrecipes = ["dp-cgan"]\n[fixed]\nnum-round = 3', "num-round"),
    (f'medgen-version = "{VERSION}"\nrecipes = ["dp-cgan"]\n[ranges]\nnum-rounds = 3', "ranges.num-rounds"),
    (f'medgen-version = "{VERSION}"\nrecipes = ["dp-cgan"]\n[ranges]\nnum-rounds = {{ min = 5, max = 1 }}',
     "min > max"),
    (f'medgen-version = "{VERSION}"\nrecipes = ["dp-cgan"]\n[choices]\ndevice = []', "choices.device"),
    ("medgen-version = ", "not valid TOML"),
])
def test_a_malformed_file_is_an_error_naming_file_and_field(tmp_path, text, field):
    path = tmp_path / "allow.toml"
    path.write_text(text)
    with pytest.raises(AllowListError) as err:
        AllowList.load(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_a_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(AllowListError, match="does not exist"):
        AllowList.load(tmp_path / "nope.toml")


def test_node_without_allow_list_accepts_and_with_one_enforces(allow_file):
    enforce_node_allow_list({"site": "A"}, _allowed_config(accountant="prv"))
    with pytest.raises(NotAllowed, match="accountant"):
        enforce_node_allow_list({"allow-list": str(allow_file)}, _allowed_config(accountant="prv"))
    with pytest.raises(NotAllowed, match="coordinator runs medgen 0.0.1"):
        enforce_node_allow_list({"allow-list": str(allow_file)}, _allowed_config(),
                                {"medgen-version": "0.0.1"})


def _tree_digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_client_app_refuses_a_run_off_the_list_without_training(tiny_federation, tmp_path, allow_file,
                                                               flower_task_identity):
    from medgen.client.app import app
    from medgen.models.registry import build_recipe

    config = _allowed_config(num_rounds=7)  # over the hospital's max of 5
    recipe = build_recipe(config)
    message = Message(RecordDict({
        "arrays": ArrayRecord(recipe.shared_state(recipe.build())),
        "config": ConfigRecord({"run-key": "k", "absolute-round": 1, "server-round": 1})}),
        dst_node_id=7, message_type="train")
    state = tmp_path / "state-A"
    node_config = {"site": "A", "data-dir": str(tiny_federation / "sites" / "A"),
                   "state-dir": str(state), "public-dir": str(tiny_federation / "public"),
                   "allow-list": str(allow_file)}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=config.to_run_config())
    data_before = _tree_digest(tiny_federation / "sites" / "A")

    reply = app(message, context)

    assert reply.has_error()
    assert reply.error.code == NOT_ALLOWED
    assert "allow-list" in reply.error.reason and "num-rounds = 7" in reply.error.reason
    assert str(allow_file) not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert not (state / "privacy_ledger.json").exists()   # nothing charged
    assert not (state / "replies").exists()               # nothing trained or stored
    assert _tree_digest(tiny_federation / "sites" / "A") == data_before
