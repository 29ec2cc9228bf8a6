"""The coordinator's federated evaluation: replies judged like train replies (one MetricRecord,
finite, bound to the node's site, privacy metrics possible), logged per site; and a Flower
simulation (2 sites, 2 rounds, 32 px) that reports per-site scalars."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medgen.config import RunConfig
from medgen.server.cli import main
from medgen.server.federated_eval import FILE, KIND, SCALARS, FederatedEvaluation
from medgen.server.run_log import read_metrics
from medgen.server.site_binding import SiteBinding
from medgen.server.validation import ReplyValidator


def _evaluation(tmp_path) -> FederatedEvaluation:
    config = RunConfig(sites="A,B,C", num_rounds=2, federated_eval_fraction=0.25)
    binding = SiteBinding(None, {11: "A", 12: "B", 13: "C"})
    return FederatedEvaluation(config, ReplyValidator({}, config.site_names, config.target_epsilon,
                                                      config.delta), binding, tmp_path)


def _reply(evaluation, node: int, **metrics) -> Message:
    request = evaluation.messages([node], 2, ArrayRecord(), {"run-key": "k"})[0]
    good = {**{k: 0.5 for k in SCALARS}, "epsilon": 3.0, "delta": 1e-5, "site-index": node - 11}
    return Message(RecordDict({"metrics": MetricRecord({**good, **metrics})}), reply_to=request)


def test_replies_are_judged_like_train_replies_and_logged_per_site(tmp_path, flower_task_identity):
    evaluation = _evaluation(tmp_path)
    assert evaluation.due(2) and not evaluation.due(1)
    request = evaluation.messages([11], 2, ArrayRecord(), {"run-key": "k"})[0]
    with_arrays = Message(RecordDict({"metrics": MetricRecord({"epsilon": 1.0}), "arrays": ArrayRecord()}),
                          reply_to=request)
    replies = [_reply(evaluation, 11),
               _reply(evaluation, 12, **{"site-index": 0}),      # node of B speaks for A
               _reply(evaluation, 13, **{"fed-tissue-bands": math.nan})]
    merged = evaluation.collect(2, replies + [with_arrays])
    assert dict(merged) == {f"{k}/A": v for k, v in {**{k: 0.5 for k in SCALARS}, "epsilon": 3.0,
                                                          "delta": 1e-5}.items()}
    record = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == KIND][0]
    assert record["round"] == 2 and list(record["per_site"]) == ["A"]
    reasons = {e["site"]: e["reason"] for e in record["excluded"][:2]}
    assert "claimed site A but is bound to B" in reasons["B"]
    assert "not finite" in reasons["C"]
    assert "exactly one MetricRecord" in record["excluded"][2]["reason"]
    assert json.loads((tmp_path / FILE).read_text())["2"]["per_site"] == record["per_site"]
    # impossible privacy metrics and missing scalars are refused too
    evaluation.collect(3, [_reply(evaluation, 11, epsilon=50.0), _reply(evaluation, 12, delta=1e-3)])
    later = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == KIND][1]
    assert later["per_site"] == {} and "impossible" in later["excluded"][0]["reason"] and \
        "differs from the run's delta" in later["excluded"][1]["reason"]


@pytest.mark.slow
def test_flower_simulation_reports_federated_scalars_per_site(tiny_federation, run_dir, capsys):
    code = main(["simulate", "--data-root", str(tiny_federation), "--out", str(run_dir),
                 "--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
                 "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=0",
                 "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                 "--set", "federated-eval-fraction=0.5", "--set", "federated-eval-every=1",
                 "--set", "options.gen-width=4", "--set", "options.disc-width=4", "--timeout", "600"])
    out = capsys.readouterr().out
    assert code == 0, out
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["per_site"][s]["num-examples"] == 4 for r in train for s in "AB")  # 8 - 4 reserved
    evaluations = [r for r in records if r["kind"] == KIND]
    assert [r["round"] for r in evaluations] == [1, 2]
    for record in evaluations:
        assert sorted(record["per_site"]) == ["A", "B"] and record["excluded"] == []
        for scores in record["per_site"].values():
            assert all(math.isfinite(scores[k]) for k in SCALARS)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in "AB":
        ledger = privacy["node_ledgers"][site]
        # 2 rounds x 2 steps + dp-cgan's moment release + 2 evaluation releases
        assert ledger["steps"] == 7 and [4.0, 1.0, 2] in ledger["plan"]["releases"]
        final = evaluations[-1]["per_site"][site]["epsilon"]
        assert ledger["epsilon"] == pytest.approx(final)
        assert privacy["reported_by_sites"][site]["epsilon"] == pytest.approx(final)
    print("federated evaluation:", json.dumps({r["round"]: r["per_site"] for r in evaluations}))
