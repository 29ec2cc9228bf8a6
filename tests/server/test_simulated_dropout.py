"""simulate-dropout really drops: of a round's train replies, round(fraction * n) never
reach the aggregation pipeline; which ones is fixed by (seed, round).

Mutation: ValidatingFedAvg ignoring ``dropout`` (or server/app.py not passing
``config.simulate_dropout``) leaves all 4 sites in the run log and fails the first test;
a dropout drawn without the round fails the determinism/variety test."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from medgen.config import ConfigError, RunConfig
from medgen.server.aggregation import AggregationPipeline
from medgen.server.checkpoint import config_hash
from medgen.server.cli import main
from medgen.server.run_log import RunDir, read_metrics
from medgen.server.strategy import ValidatingFedAvg, simulated_dropout, specs_of

SITES = ("A", "B", "C", "D")
GLOBAL = {"w": np.ones((2, 3), np.float32)}


def _reply(node: int, site: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(GLOBAL["w"] * (site + 1))}),
                          "metrics": MetricRecord({"num-examples": 10, "site-index": site, "epsilon": 1.0,
                                                   "delta": 1e-5})})
    return Message(content=content, metadata=meta)


def _strategy(tmp_path, config: RunConfig) -> ValidatingFedAvg:
    pipeline = AggregationPipeline.for_run(config, specs_of(ArrayRecord({"w": Array(GLOBAL["w"])})), (),
                                           RunDir(tmp_path), resume=False)
    return ValidatingFedAvg(pipeline, dropout=config.simulate_dropout, seed=config.seed)


def test_dropout_removes_replies_before_aggregation(tmp_path):
    config = RunConfig(sites=",".join(SITES), min_sites=1, simulate_dropout=0.5)
    _strategy(tmp_path, config).aggregate_train(1, [_reply(100 + i, i) for i in range(4)])
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert len(line["per_site"]) == 2 and not line["excluded"]  # lost, not rejected


def test_too_many_lost_keeps_previous_weights(tmp_path):
    config = RunConfig(sites=",".join(SITES), min_sites=3, simulate_dropout=0.5)
    arrays, _ = _strategy(tmp_path, config).aggregate_train(1, [_reply(100 + i, i) for i in range(4)])
    assert arrays is None  # 2 replies left < min-sites 3: the round keeps the previous weights
    assert len(read_metrics(tmp_path / "metrics.jsonl")[-1]["per_site"]) == 2


def test_lost_replies_depend_on_seed_and_round_only():
    replies = [_reply(100 + i, i % 4) for i in range(40)]
    lost = [simulated_dropout(replies, 0.25, seed=0, absolute_round=r)[1] for r in (1, 2)]
    assert len(lost[0]) == len(lost[1]) == 10 and lost[0] != lost[1]
    again = simulated_dropout(list(reversed(replies)), 0.25, seed=0, absolute_round=1)[1]
    assert again == lost[0]  # the order Flower delivers replies in does not matter
    assert simulated_dropout(replies, 0.0, seed=0, absolute_round=1) == (sorted(
        replies, key=lambda m: m.metadata.src_node_id), [])


def test_config_bounds():
    with pytest.raises(ConfigError, match="simulate-dropout"):
        RunConfig(simulate_dropout=1.0)
    with pytest.raises(ConfigError, match="simulate-actors"):
        RunConfig(simulate_actors=-1)


def test_a_deployment_refuses_simulate_dropout_before_anything_starts(tmp_path, capsys):
    """`medgen-server run` with simulate-dropout: refused with exit 2 and a line naming the
    key, before the state dir is even looked at (it does not exist here). Mutation: removing
    the check in server/deploy_cli.py gets past it to the missing-state error instead."""
    code = main(["run", "--state", str(tmp_path / "no-state"), "--out", str(tmp_path / "run"),
                 "--set", "simulate-dropout=0.25"])
    assert code == 2
    err = capsys.readouterr().err
    assert "simulate-dropout = 0.25 is a simulation setting" in err
    assert not (tmp_path / "run").exists()


def test_the_actor_count_does_not_change_the_checkpoint_fingerprint():
    """simulate-actors only says how many sites train at once: a run resumed with another
    count must accept its checkpoint; simulate-dropout changes results and is hashed."""
    base = RunConfig()
    assert config_hash(base.replace(simulate_actors=3)) == config_hash(base)
    assert config_hash(base.replace(simulate_dropout=0.5)) != config_hash(base)
