"""Federated evaluation at one node, the ClientApp called directly: evaluation patients never
train, and an evaluate message returns only DP-released scalars, accounted in the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import medgen.client.app as client_app
import medgen.client.rounds as client_rounds
from medgen.data.eval_split import split_patients, training_part
from medgen.config import RunConfig
from medgen.data.site_data import load_site
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for

OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}


@pytest.fixture
def config(tiny_federation, tmp_path) -> RunConfig:
    return RunConfig(num_rounds=1, local_steps=2, batch_size=2, image_size=32, sites="A,B",
                     accountant="rdp", data_root=str(tiny_federation), state_root=str(tmp_path / "state"),
                     eval_every=0, target_epsilon=8.0, options=OPTIONS, federated_eval_fraction=0.5)


def _message(config: RunConfig, kind: str, arrays: ArrayRecord | None = None) -> Message:
    recipe = build_recipe(config)
    arrays = arrays or ArrayRecord(recipe.shared_state(recipe.build()))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"run-key": "run-1", "absolute-round": 1,
                                                                   "server-round": 1})})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(config: RunConfig) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                   state=RecordDict(), run_config=config.to_run_config())


def test_split_is_deterministic_disjoint_and_keeps_training_patients():
    split = split_patients("A", 40, 0.25)
    assert split == split_patients("A", 40, 0.25) and split != split_patients("B", 40, 0.25)
    assert len(split.evaluation) == 10 and len(split.half_a) == len(split.half_b) == 5
    assert set(split.train).isdisjoint(split.evaluation)
    assert sorted(split.train + split.evaluation) == list(range(40))
    assert split_patients("A", 40, 0.0).evaluation == ()
    with pytest.raises(ValueError, match="too few"):
        split_patients("A", 4, 0.5)


def test_evaluation_patients_never_enter_training(config, flower_task_identity, monkeypatch):
    seen = []

    class Recording(client_rounds.PatientDataset):
        def __init__(self, site_data, generator_seed):
            seen.append(site_data)
            super().__init__(site_data, generator_seed)

    monkeypatch.setattr(client_rounds, "PatientDataset", Recording)
    reply = client_app.app(_message(config, "train"), _context(config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""

    site = load_site(Path(config.data_root) / "sites" / "B", 32)
    split = split_patients("B", site.num_patients, 0.5)
    assert len(split.train) == 4 and len(split.evaluation) == 4  # 8 subjects at site B
    trained = seen[0]
    assert trained.num_patients == 4 and reply.content["metrics"]["num-examples"] == 4
    held_out = torch.cat([site.images[site.patient_index == p] for p in split.evaluation])
    for image in trained.images:  # no training image is an evaluation patient's image
        assert not (held_out == image).flatten(1).all(1).any()
    assert torch.equal(trained.images, training_part(site, "B", 0.5).images)
    ledger = json.loads((Path(config.state_root) / "B" / "privacy_ledger.json").read_text())
    assert ledger["plan"]["sample_rate"] == sample_rate_for(4, config.batch_size)
    assert ledger["plan"]["releases"][-1] == [config.federated_eval_noise, 1.0, 1]


def test_evaluate_returns_only_scalars_and_is_accounted_once(config, flower_task_identity):
    trained = client_app.app(_message(config, "train"), _context(config))
    assert not trained.has_error()
    ledger_path = Path(config.state_root) / "B" / "privacy_ledger.json"
    before = json.loads(ledger_path.read_text())
    request = _message(config, "evaluate", trained.content["arrays"])
    reply = client_app.app(request, _context(config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert list(content.metric_records) == ["metrics"] and len(content) == 1  # no arrays, no strings
    metrics = dict(content["metrics"])
    assert {"fed-tissue-bands", "fed-tissue-bands-floor", "fed-tissue-bands-sd", "epsilon", "delta",
            "site-index"} <= set(metrics)
    assert metrics["site-index"] == 1 and metrics["fed-tissue-bands"] > 0
    after = json.loads(ledger_path.read_text())
    assert after["history"][len(before["history"]):] == [[config.federated_eval_noise, 1.0, 1]]
    assert after["rounds"][-1]["run_id"].startswith("eval:")
    assert metrics["epsilon"] == pytest.approx(after["rounds"][-1]["epsilon"])
    assert before["rounds"][-1]["epsilon"] < metrics["epsilon"] <= config.target_epsilon + 1e-6
    # the same request again: the stored scalars, nothing spent
    again = client_app.app(_message(config, "evaluate", trained.content["arrays"]), _context(config))
    assert dict(again.content["metrics"]) == metrics
    print("federated eval scalars:", {k: round(v, 4) for k, v in metrics.items()})
    assert json.loads(ledger_path.read_text()) == after
