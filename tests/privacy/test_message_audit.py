"""Message audit: the outbox mod records what leaves, the checker accepts only weights and
scalar metrics (or SecAgg+ protocol traffic) and catches images, strings, paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from medgen.client.app import outbox_mod  # privacy/message_audit.py's recorder, on the node's state dir
from medgen.config import RunConfig
from medgen.privacy.message_audit import (OUTBOX_FAILED, OUTBOX_FILE, check_outbox,
                                          read_outbox)
from medgen.server.strategy import ArraySpec

SIZE = 32
WEIGHTS = {"gen.conv.weight": np.zeros((8, 4, 3, 3), np.float32),
           "gen.linear.weight": np.zeros((64, 16), np.float32),
           "gen.steps": np.zeros((1,), np.int64)}
EXPECTED = {k: ArraySpec(v.shape, str(v.dtype)) for k, v in WEIGHTS.items()}


def context(tmp_path) -> Context:
    config = RunConfig(sites="A,B", image_size=SIZE, data_root=str(tmp_path / "data"),
                       state_root=str(tmp_path / "state"))
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                   state=RecordDict(), run_config=config.to_run_config())


def request(message_type: str = "train") -> Message:
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in WEIGHTS.items()})}),
                   dst_node_id=7, message_type=message_type)


def plain_reply(msg, arrays=None, metrics=None, extra=None) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in (arrays or WEIGHTS).items()}),
        "metrics": MetricRecord(metrics or {"num-examples": 8, "epsilon": 1.5, "site-index": 1})})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=msg)


def send(tmp_path, make_reply, message_type: str = "train") -> tuple[Message, list]:
    msg = request(message_type)
    reply = outbox_mod(msg, context(tmp_path), lambda m, c: make_reply(m))
    return reply, read_outbox(tmp_path / "state" / "B" / OUTBOX_FILE)


def test_a_clean_reply_is_recorded_unchanged_and_passes(tmp_path, flower_task_identity):
    reply, records = send(tmp_path, plain_reply)
    assert not reply.has_error() and sorted(reply.content["arrays"]) == sorted(WEIGHTS)
    assert len(records) == 1 and records[0]["arrays"]["arrays"]["gen.conv.weight"]["shape"] == [8, 4, 3, 3]
    assert "value" not in json.dumps(records[0]["arrays"])  # shapes only, never weights
    assert check_outbox(records, EXPECTED, SIZE) == []


@pytest.mark.parametrize("bad, fragment", [
    ({"arrays": {**WEIGHTS, "gen.extra": np.zeros((2,), np.float32)}}, "not one of the model's shared"),
    ({"arrays": {**WEIGHTS, "batch": np.zeros((4, 1, SIZE, SIZE), np.float32)}}, "shaped like an image"),
    ({"arrays": {**WEIGHTS, "gen.conv.weight": np.zeros((8, 4, 5, 5), np.float32)}}, "the shared weight is"),
    ({"metrics": {"num-examples": 8, "losses": [0.1, 0.2]}}, "single number"),
    ({"metrics": {"num-examples": 8, "loss": float("nan")}}, "not finite"),
    ({"extra": {"config": ConfigRecord({"file": "/data/A/images/patient-007.nii.gz"})}}, "path"),
    ({"extra": {"config": ConfigRecord({"id": "PAT-0007"})}}, "string leaves the node"),
])
def test_checker_catches_what_must_not_leave(tmp_path, flower_task_identity, bad, fragment):
    _, records = send(tmp_path, lambda m: plain_reply(m, **bad))
    violations = check_outbox(records, EXPECTED, SIZE)
    assert violations and any(fragment in v.reason for v in violations), [str(v) for v in violations]


def test_error_replies_must_not_name_paths(tmp_path, flower_task_identity):
    _, records = send(tmp_path, lambda m: Message(Error(4002, "site B: training failed with "
                                                        "ValueError (details in the node log)"), reply_to=m))
    assert check_outbox(records, EXPECTED, SIZE) == []
    _, records = send(tmp_path, lambda m: Message(Error(4002, "cannot read /data/B/x.nii.gz"), reply_to=m))
    assert "path" in check_outbox(records[1:], EXPECTED, SIZE)[0].reason


def secagg_reply(msg, shapes, status="") -> Message:
    masked = [np.array([3])] + [np.zeros(s, np.int64) for s in shapes]
    return Message(RecordDict({
        "fitres.parameters": ArrayRecord(),
        "fitres.metrics": ConfigRecord({"epsilon": 1.0, "site-index": 1}),
        "fitres.num_examples": MetricRecord({"num_examples": 8}),
        "fitres.status": ConfigRecord({"code": 0, "message": status}),
        RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]}),
    }), reply_to=msg)


def test_secure_aggregation_replies_are_checked_against_the_weight_shapes(tmp_path, flower_task_identity):
    shapes = [v.shape for v in WEIGHTS.values()]
    _, records = send(tmp_path, lambda m: secagg_reply(m, shapes))
    assert check_outbox(records, EXPECTED, SIZE) == []
    _, records = send(tmp_path, lambda m: secagg_reply(m, shapes + [(1, SIZE, SIZE)]))
    assert any("shaped like an image" in v.reason for v in check_outbox(records[1:], EXPECTED, SIZE))
    _, records = send(tmp_path, lambda m: secagg_reply(m, shapes, status="/home/site/data"))
    assert any("string leaves" in v.reason for v in check_outbox(records[2:], EXPECTED, SIZE))


def test_an_exception_in_the_app_leaves_as_a_fixed_recorded_sentence(tmp_path, flower_task_identity):
    def crash(msg):
        raise FileNotFoundError("/data/B/images/patient-007.nii.gz")

    reply, records = send(tmp_path, crash)
    assert reply.has_error() and "patient-007" not in reply.error.reason
    assert check_outbox(records, EXPECTED, SIZE) == [] and "error" in records[0]


def test_unrecordable_reply_is_replaced_by_an_error(tmp_path, flower_task_identity):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "B").write_text("a file where the node's state dir should be")
    reply = outbox_mod(request(), context(tmp_path), lambda m, c: plain_reply(m))
    assert reply.has_error() and reply.error.code == OUTBOX_FAILED


# -- a full simulated run on Flower's engine -------------------------------------------------


def simulate(data_root, run_dir, *extra: str) -> int:
    from medgen.server.cli import main

    return main(["simulate", "--data-root", str(data_root), "--out", str(run_dir),
                 "--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
                 "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=0",
                 "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                 "--set", "options.gen-width=4", "--set", "options.disc-width=4",
                 "--timeout", "900", *extra])


def shared_specs(run_dir) -> tuple[RunConfig, dict]:
    from medgen.models.registry import build_recipe
    from medgen.server.strategy import specs_of

    config = RunConfig.from_toml(run_dir / "config.toml")
    recipe = build_recipe(config)
    return config, specs_of(ArrayRecord(recipe.shared_state(recipe.build())))


@pytest.mark.slow
def test_message_audit_over_a_full_simulated_run(tiny_federation, run_dir, capsys):
    from pathlib import Path

    from medgen.privacy.message_audit import audit_node_outboxes

    assert simulate(tiny_federation, run_dir) == 0, capsys.readouterr().out
    config, expected = shared_specs(run_dir)
    violations = audit_node_outboxes(Path(config.state_root), config.site_names, expected, config.image_size)
    assert violations == {"A": [], "B": []}, {s: [str(v) for v in vs] for s, vs in violations.items()}
    for site in config.site_names:
        records = read_outbox(Path(config.state_root) / site / OUTBOX_FILE)
        assert len(records) == 2  # one train reply per round, nothing else left the node
        for record in records:
            assert set(record["arrays"]["arrays"]) == set(expected)
            assert record["configs"] == {} and set(record["metrics"]) == {"metrics"}


def evaluate_reply(msg, arrays=None, extra=None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"fed-tissue-bands": 0.3, "epsilon": 2.0, "site-index": 1})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=msg)


@pytest.mark.parametrize("bad, fragment", [
    ({"arrays": WEIGHTS}, "array record"),                     # weights have no business here
    ({"extra": {"config": ConfigRecord({"n": "3"})}}, "config record"),
    ({"extra": {"more": MetricRecord({"x": 1.0})}}, "exactly one MetricRecord"),
])
def test_an_evaluate_reply_may_carry_scalars_only(tmp_path, flower_task_identity, bad, fragment):
    _, records = send(tmp_path, evaluate_reply, message_type="evaluate")
    assert records[0]["message_type"] == "evaluate" and check_outbox(records, EXPECTED, SIZE) == []
    _, records = send(tmp_path, lambda m: evaluate_reply(m, **bad), message_type="evaluate")
    violations = check_outbox(records[1:], EXPECTED, SIZE)
    assert violations and any(fragment in v.reason for v in violations), [str(v) for v in violations]
