"""Oracles for the validating FedAvg: aggregation = numpy weighted mean, exclusions with
reasons, epsilon as max, too few sites keeps the previous weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from medgen.config import RunConfig
from medgen.server.aggregation import AggregationPipeline
from medgen.server.run_log import RunDir, read_metrics
from medgen.server.strategy import (ValidatingFedAvg, aggregate_site_metrics, specs_of,
                                    weighted_average, ReplyValidator)

SITES = ("A", "B", "C", "D")
rng = np.random.default_rng(0)
GLOBAL = {"gen.w": rng.normal(size=(3, 4)).astype(np.float32),
          "gen.b": rng.normal(size=(4,)).astype(np.float32),
          "gen.steps": np.array([7], dtype=np.int64)}


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def reply(node: int, arrays: dict, metrics: dict, extra: RecordDict | None = None) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    if extra:
        for k, v in extra.items():
            content[k] = v
    return Message(content=content, metadata=_meta(node))


def error_reply(node: int, reason: str) -> Message:
    return Message(error=Error(4001, reason), metadata=_meta(node))


def update(scale: float) -> dict:
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in GLOBAL.items()}


def metrics(site: int, n: int, eps: float, loss: float = 1.0) -> dict:
    return {"num-examples": n, "site-index": site, "epsilon": eps, "delta": 1e-5, "loss_gen": loss}


def strategy(tmp_path, min_sites=2, offset=0, **config) -> ValidatingFedAvg:
    """The server's strategy for a 4-site run, its pipeline built as server/app.py does."""
    run_config = RunConfig(sites=",".join(SITES), min_sites=min_sites, **config)
    expected = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    pipeline = AggregationPipeline.for_run(run_config, specs_of(expected), (), RunDir(tmp_path), resume=False)
    return ValidatingFedAvg(pipeline, round_offset=offset)


def test_aggregate_equals_numpy_weighted_mean(tmp_path):
    weights, scales = [10, 30, 60], [1.0, -2.0, 0.5]
    replies = [reply(i + 1, update(s), metrics(i, n, 1.0)) for i, (n, s) in enumerate(zip(weights, scales))]
    arrays, _ = strategy(tmp_path).aggregate_train(1, replies)
    for key in ("gen.w", "gen.b"):
        oracle = np.average(np.stack([GLOBAL[key].astype(np.float64) * s for s in scales]), axis=0,
                            weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), oracle, rtol=1e-6, atol=1e-6)
        assert arrays[key].dtype == "float32"
    assert arrays["gen.steps"].numpy().dtype == np.int64  # dtype kept for integer buffers


def test_weighted_average_differs_from_unweighted():
    # guards against a plain mean passing the oracle by accident
    specs = {"w": specs_of(ArrayRecord({"w": Array(np.zeros(1, np.float32))}))["w"]}
    from medgen.server.strategy import AcceptedReply
    out = weighted_average([AcceptedReply("A", 1, {"w": np.array([0.0], np.float32)}, {}),
                            AcceptedReply("B", 3, {"w": np.array([4.0], np.float32)}, {})], specs)
    assert out["w"][0] == pytest.approx(3.0)


@pytest.mark.parametrize("bad, reason", [
    ({"gen.w": np.full((3, 4), np.nan, np.float32)}, "non-finite"),
    ({"gen.w": np.zeros((4, 3), np.float32)}, "expected (3, 4)"),
    ({"gen.w": np.zeros((3, 4), np.float64)}, "float64"),
    ({"gen.w_renamed": GLOBAL["gen.w"]}, "keys differ"),
])
def test_bad_arrays_are_excluded_with_reason(tmp_path, bad, reason):
    broken = {k: v for k, v in update(1.0).items() if k != "gen.w"} | bad
    good = [reply(1, update(1.0), metrics(0, 10, 1.0)), reply(2, update(3.0), metrics(1, 10, 1.0))]
    strat = strategy(tmp_path)
    arrays, agg = strat.aggregate_train(1, good + [reply(3, broken, metrics(2, 1000, 9.0))])
    # the broken site (weight 1000) did not influence the average nor the max epsilon
    np.testing.assert_allclose(arrays["gen.w"].numpy(), GLOBAL["gen.w"] * 2.0, rtol=1e-6)
    assert agg["epsilon"] == pytest.approx(1.0)
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert line["kind"] == "train" and set(line["per_site"]) == {"A", "B"}
    assert line["excluded"][0]["site"] == "C" and reason in line["excluded"][0]["reason"]


@pytest.mark.parametrize("bad_metrics, reason", [
    ({"num-examples": 0}, "num-examples"),
    ({"epsilon": float("nan")}, "not finite"),
    ({"site-index": 9}, "site-index"),
])
def test_bad_metrics_are_excluded(tmp_path, bad_metrics, reason):
    good = [reply(1, update(1.0), metrics(0, 10, 1.0)), reply(2, update(1.0), metrics(1, 10, 1.0))]
    _, agg = strategy(tmp_path).aggregate_train(1, good + [reply(3, update(5.0), metrics(2, 10, 1.0) | bad_metrics)])
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert len(line["excluded"]) == 1 and reason in line["excluded"][0]["reason"]
    assert agg["sites"] == 2


def test_extra_records_and_error_replies_are_excluded(tmp_path):
    strat = strategy(tmp_path)
    good = [reply(1, update(1.0), metrics(0, 10, 1.0)), reply(2, update(1.0), metrics(1, 10, 2.0))]
    strat.aggregate_train(1, good)  # the strategy learns node 2 -> site B
    leaky = reply(3, update(1.0), metrics(2, 10, 1.0), RecordDict({"cfg": ConfigRecord({"path": "/data/x"})}))
    strat.aggregate_train(2, [good[0], leaky, error_reply(2, "site B: refused to train, budget")])
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    reasons = {e["site"]: e["reason"] for e in line["excluded"]}
    assert "ConfigRecord" in reasons["node-3"] or "ConfigRecord" in reasons.get("C", "")
    assert "budget" in reasons["B"]


def test_epsilon_aggregates_as_max_other_metrics_weighted(tmp_path):
    replies = [reply(1, update(1.0), metrics(0, 10, 0.5, loss=1.0)),
               reply(2, update(1.0), metrics(1, 30, 3.25, loss=3.0)),
               reply(3, update(1.0), metrics(2, 60, 1.5, loss=0.0))]
    _, agg = strategy(tmp_path).aggregate_train(1, replies)
    assert agg["epsilon"] == pytest.approx(3.25)  # a mean would be 1.7
    assert agg["loss_gen"] == pytest.approx((10 * 1 + 30 * 3) / 100)
    assert agg["num-examples"] == 100


def test_too_few_valid_replies_keep_previous_weights(tmp_path):
    strat = strategy(tmp_path, min_sites=2)
    arrays, agg = strat.aggregate_train(1, [reply(1, update(2.0), metrics(0, 10, 1.0)),
                                            error_reply(2, "site B: refused")])
    assert arrays is None and agg is None  # Flower's loop keeps the previous global arrays
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert line["aggregate"]["kept-previous-weights"] == 1.0 and "A" in line["per_site"]


def test_absolute_round_in_config_and_log(tmp_path, flower_task_identity):
    strat = strategy(tmp_path, offset=5)

    class FakeGrid:
        def get_node_ids(self):
            return [11, 12]

    messages = list(strat.configure_train(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                          ConfigRecord({"run-key": "k"}), FakeGrid()))
    assert {m.content["config"]["absolute-round"] for m in messages} == {7}
    strat.aggregate_train(2, [reply(1, update(1.0), metrics(0, 10, 1.0)), reply(2, update(1.0), metrics(1, 10, 1.0))])
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["round"] == 7


def test_validator_is_usable_alone():
    validator = ReplyValidator(specs_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})), SITES)
    verdict = validator.check(reply(5, update(1.0), metrics(3, 4, 1.0)))
    assert verdict.site == "D" and verdict.num_examples == 4


def test_site_indexed_rows_come_from_their_own_site_only():
    """Oracle: row k = weighted mean of site k's rows; other keys = plain FedAvg; rows of a
    silent site keep the current global value."""
    from medgen.server.strategy import AcceptedReply, site_rows_from_own_site, weighted_average, specs_of
    from flwr.app import Array, ArrayRecord

    current = {"table": np.zeros((3, 2), np.float32), "w": np.zeros(2, np.float32)}
    def reply(site, n, table, w):
        return AcceptedReply(site=site, num_examples=n, metrics={},
                             arrays={"table": np.asarray(table, np.float32), "w": np.asarray(w, np.float32)})
    replies = [reply("A", 1, [[1, 1], [9, 9], [9, 9]], [1, 1]),
               reply("A", 3, [[5, 5], [9, 9], [9, 9]], [3, 3]),
               reply("B", 4, [[9, 9], [2, 4], [9, 9]], [0, 8])]
    specs = specs_of(ArrayRecord({k: Array(v) for k, v in current.items()}))
    averaged = site_rows_from_own_site(weighted_average(replies, specs), replies, current,
                                       ("table",), ("A", "B", "C"))
    np.testing.assert_allclose(averaged["table"], [[4, 4], [2, 4], [0, 0]])  # (1*1+3*5)/4 = 4
    np.testing.assert_allclose(averaged["w"], [(1 + 9 + 0) / 8, (1 + 9 + 32) / 8])
    plain = weighted_average(replies, specs)["table"]
    assert not np.allclose(plain, averaged["table"])  # plain FedAvg would dilute the rows
