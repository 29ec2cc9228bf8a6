"""The ClientApp called directly with a Message and a Context: what leaves the node, budget
refusal, and replay of a repeated request (no second charge)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medgen.client.app import BUDGET_EXCEEDED, app
from medgen.config import RunConfig
from medgen.models.registry import build_recipe

OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}


def _config(federation, state_root, num_rounds=1) -> RunConfig:
    return RunConfig(num_rounds=num_rounds, local_steps=2, batch_size=2, image_size=32, sites="A,B",
                     accountant="rdp",  # calibration at tiny sizes: rdp ~2 s, prv ~8 s here
                     data_root=str(federation), state_root=str(state_root), eval_every=0,
                     target_epsilon=5.0, options=OPTIONS)


def _message(config: RunConfig, server_round: int, run_key: str = "run-1") -> Message:
    recipe = build_recipe(config)
    shared = recipe.shared_state(recipe.build())
    content = RecordDict({"arrays": ArrayRecord(shared),
                          "config": ConfigRecord({"run-key": run_key, "absolute-round": server_round,
                                                  "server-round": server_round})})
    return Message(content, dst_node_id=7, message_type="train")


def _context(config: RunConfig, partition: int = 1) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config=config.to_run_config())


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def config(tiny_federation, tmp_path) -> RunConfig:
    return _config(tiny_federation, tmp_path / "state")


def test_reply_holds_only_shared_weights_and_scalars(config, flower_task_identity):
    reply = app(_message(config, 1), _context(config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert len(content.config_records) == 0
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    assert len(content) == 2
    recipe = build_recipe(config)
    arrays = content["arrays"]
    assert sorted(arrays) == sorted(recipe.shared_keys(recipe.build()))
    assert all(k.startswith("gen.") for k in arrays)  # the private discriminator stays home
    for key, array in arrays.items():
        value = array.numpy()
        assert np.all(np.isfinite(value))
        # no image-like payload: nothing shaped like a batch of 32x32 images or label maps
        assert tuple(value.shape[-2:]) != (32, 32), key
    metrics = content["metrics"]
    for key, value in metrics.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
    assert metrics["site-index"] == 1 and metrics["num-examples"] == 8 and metrics["steps"] == 2
    assert 0 < metrics["epsilon"] <= config.target_epsilon + 1e-6


def test_over_budget_site_refuses_without_training(config, flower_task_identity):
    node_state = config.state_root + "/B"
    first = app(_message(config, 1), _context(config))  # plan: 1 round x 2 steps, spent now
    assert not first.has_error()
    from pathlib import Path
    ledger, local = Path(node_state) / "privacy_ledger.json", Path(node_state) / "local_state.pt"
    before = (_digest(ledger), _digest(local))
    refused = app(_message(config, 2), _context(config))  # a round beyond the planned schedule
    assert refused.has_error() and refused.error.code == BUDGET_EXCEEDED
    assert "budget" in refused.error.reason and node_state not in refused.error.reason  # no paths
    assert (_digest(ledger), _digest(local)) == before  # ledger unchanged, nothing trained


def test_replayed_request_is_answered_from_store_without_charge(config, flower_task_identity):
    config = config.replace(num_rounds=3)
    first = app(_message(config, 1), _context(config, partition=0))
    from pathlib import Path
    ledger = Path(config.state_root) / "A" / "privacy_ledger.json"
    charged = _digest(ledger)
    again = app(_message(config, 1), _context(config, partition=0))   # coordinator restarted
    assert _digest(ledger) == charged                                 # not charged twice
    for key in first.content["arrays"]:
        np.testing.assert_array_equal(first.content["arrays"][key].numpy(), again.content["arrays"][key].numpy())
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])
    # a different run key is a different request: it trains and is charged
    app(_message(config, 1, run_key="run-2"), _context(config, partition=0))
    assert _digest(ledger) != charged


def test_failure_reply_names_no_paths(tiny_federation, tmp_path, flower_task_identity):
    config = _config(tmp_path / "no-such-root", tmp_path / "state")
    reply = app(_message(config, 1), _context(config))
    assert reply.has_error()
    assert str(tmp_path) not in reply.error.reason and "node log" in reply.error.reason


def test_bridge_style_release_is_planned_accounted_once_and_only_own_row(tiny_federation, tmp_path,
                                                                         flower_task_identity):
    """bridge-translate's one-off style release goes through the node's ledger: planned with
    the DP-SGD schedule, recorded as (sigma_style, 1.0, 1) in the same history, made once."""
    import json
    from pathlib import Path

    # target epsilon 5 here: the default releases (the foundation's sigma 3 and the style's
    # sigma 1) alone spend epsilon 5.02, so this run's style release is noisier
    options = {**OPTIONS, "seg-pretrain-steps": 2, "seg-steps-per-round": 1, "seg-batch-size": 4,
               "style-samples": 8, "style-noise-multiplier": 2.0}
    config = _config(tiny_federation, tmp_path / "state", num_rounds=2).replace(
        recipe="bridge-translate", options=options)
    first = app(_message(config, 1), _context(config))  # site B = row 1
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    rows = first.content["arrays"]["style_release"].numpy()
    assert np.all(rows[0] == 0) and np.any(rows[1] != 0)  # only its own row
    assert first.content["metrics"]["steps"] == 2
    ledger = json.loads((Path(config.state_root) / "B" / "privacy_ledger.json").read_text())
    planned = ledger["plan"]["releases"]
    assert [2.0, 1.0, 1] in planned  # the style release (the foundation declares its own too)
    made = ledger["history"][:len(planned)]
    assert sorted(made) == sorted(planned)  # made first, in the same history
    assert ledger["rounds"][0]["steps"] == 2 + len(planned)
    assert [r["noise_multiplier"] for r in ledger["released"]] == [m[0] for m in made]
    # round 2 gets its row back from the server: no second release
    content = RecordDict({"arrays": first.content["arrays"],
                          "config": ConfigRecord({"run-key": "run-1", "absolute-round": 2,
                                                  "server-round": 2})})
    second = app(Message(content, dst_node_id=7, message_type="train"), _context(config))
    assert not second.has_error(), second.error.reason if second.has_error() else ""
    np.testing.assert_array_equal(second.content["arrays"]["style_release"].numpy()[1], rows[1])
    ledger = json.loads((Path(config.state_root) / "B" / "privacy_ledger.json").read_text())
    sigma, q = ledger["plan"]["noise_multiplier"], ledger["plan"]["sample_rate"]
    assert ledger["history"] == made + [[sigma, q, 4]]
    assert second.content["metrics"]["epsilon"] <= config.target_epsilon + 1e-9
    # a new run on this ledger (fresh model, no local state of that run) reuses the stored
    # release values instead of releasing again: the plan's budget is already spent, so it
    # is refused for its DP-SGD steps, not charged for a second release
    third = app(_message(config, 1, run_key="run-2"), _context(config))
    assert third.has_error() and third.error.code == BUDGET_EXCEEDED
    assert json.loads((Path(config.state_root) / "B" / "privacy_ledger.json").read_text())["history"] == \
        made + [[sigma, q, 4]]


def test_a_round_that_crashes_mid_training_leaves_the_ledger_untouched(config, flower_task_identity,
                                                                       monkeypatch):
    """privacy/round.py commits on a clean exit only: noise drawn in a crashed round never
    left the node, so the ledger (and the local state) stay as they were."""
    from pathlib import Path

    from medgen.client.app import TRAINING_FAILED
    from medgen.models.dp_cgan import DPConditionalGAN

    config = config.replace(num_rounds=2)
    assert not app(_message(config, 1), _context(config)).has_error()
    state = Path(config.state_root) / "B"
    before = (_digest(state / "privacy_ledger.json"), _digest(state / "local_state.pt"))
    original = DPConditionalGAN.disc_step

    def crash_after_a_step(self, *args, **kwargs):
        original(self, *args, **kwargs)  # a real, noised DP step was taken ...
        raise RuntimeError("simulated crash")  # ... then the node fails

    monkeypatch.setattr(DPConditionalGAN, "disc_step", crash_after_a_step)
    failed = app(_message(config, 2), _context(config))
    assert failed.has_error() and failed.error.code == TRAINING_FAILED
    assert (_digest(state / "privacy_ledger.json"), _digest(state / "local_state.pt")) == before
    monkeypatch.setattr(DPConditionalGAN, "disc_step", original)
    retried = app(_message(config, 2), _context(config))  # trains afresh, charged once
    assert not retried.has_error() and retried.content["metrics"]["steps"] == 2


def test_the_round_seed_is_derived_once_and_every_draw_follows_it(config, flower_task_identity,
                                                                  monkeypatch):
    """One seed per (run seed, site, round), derived by the node: DP sampling and noise
    (simulation), the dataset's slice draws and the recipe's public draws all come from it,
    so a replayed simulation is reproducible and two rounds never share draws."""
    from medgen.models.dp_cgan import DPConditionalGAN

    seen = []
    original = DPConditionalGAN.train_local

    def spy(self, model, ctx):
        seen.append((ctx.seed, ctx.private.seed, ctx.data._seed, ctx.stream_seed(0)))
        return original(self, model, ctx)

    monkeypatch.setattr(DPConditionalGAN, "train_local", spy)
    config = config.replace(num_rounds=2)
    app(_message(config, 1), _context(config))
    app(_message(config, 2), _context(config))
    (seed1, private1, data1, stream1), (seed2, *_rest) = seen
    assert seed1 == private1 == data1 and stream1 not in (seed1, seed1 + 1, seed1 + 2)
    assert seed2 != seed1


@pytest.fixture
def unlabelled_federation(tiny_federation, tmp_path):
    """The tiny federation with site B's labels/ folder removed (an unlabelled hospital)."""
    import shutil

    root = tmp_path / "unlabelled"
    shutil.copytree(tiny_federation, root)
    shutil.rmtree(root / "sites" / "B" / "labels")
    return root


def test_a_recipe_needing_labels_refuses_an_unlabelled_site_before_any_ledger_change(
        unlabelled_federation, tmp_path, flower_task_identity):
    """dp-cgan needs a label map with every image: at plan time, before a privacy round
    opens, the node refuses with a clear, path-free reason; no ledger, no local state."""
    from pathlib import Path

    from medgen.client.app import SITE_DATA_REFUSED

    config = _config(unlabelled_federation, tmp_path / "state")
    reply = app(_message(config, 1), _context(config))
    assert reply.has_error() and reply.error.code == SITE_DATA_REFUSED
    assert "dp-cgan" in reply.error.reason and "no labels" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason
    state = Path(config.state_root) / "B"
    assert not (state / "privacy_ledger.json").exists() and not (state / "local_state.pt").exists()


def test_site_gan_trains_two_rounds_on_an_unlabelled_site(unlabelled_federation, tmp_path,
                                                         flower_task_identity):
    """The label-free path: site-gan trains on the site's images alone, accounted as usual."""
    import json
    from pathlib import Path

    config = _config(unlabelled_federation, tmp_path / "state", num_rounds=2).replace(
        recipe="site-gan", options={"gen-width": 4, "disc-width": 4, "noise-dim": 8})
    epsilons = []
    for server_round in (1, 2):
        reply = app(_message(config, server_round), _context(config))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content["metrics"]
        assert metrics["steps"] == 2 and metrics["num-examples"] > 0
        assert set(reply.content["arrays"].keys()) == set(build_recipe(config).shared_keys(
            build_recipe(config).build()))
        epsilons.append(metrics["epsilon"])
    assert 0 < epsilons[0] < epsilons[1] <= 5.0
    ledger = json.loads((Path(config.state_root) / "B" / "privacy_ledger.json").read_text())
    assert ledger  # both rounds committed to the node's ledger


def test_a_volume_recipe_on_a_site_of_2d_slices_is_refused_before_any_ledger_change(
        config, tmp_path, flower_task_identity):
    """The node serves the site as the recipe consumes it: volume-gan asks for volumes, the
    tiny federation holds one 2D slice per patient, so nothing is usable; refused with a
    path-free reason at plan time, nothing written to the ledger."""
    from pathlib import Path

    from medgen.client.app import SITE_DATA_REFUSED

    volume = config.replace(recipe="volume-gan", options={"gen-width": 4, "disc-width": 4, "depth": 4})
    reply = app(_message(volume, 1), _context(volume))
    assert reply.has_error() and reply.error.code == SITE_DATA_REFUSED, reply.error.reason
    # read as volumes (not served as slices and then refused by check_site): no usable records
    assert "no usable records for recipe 'volume-gan'" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason
    assert not (Path(volume.state_root) / "B" / "privacy_ledger.json").exists()
