"""Checkpoints: atomic (a crash mid-save leaves the old one), refused on config mismatch,
resume trains only the remaining rounds from the saved weights and run key, and a round
that trains nobody never overwrites trained weights."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from torch import nn

from medgen.config import RunConfig
from medgen.models.recipe import Recipe
from medgen.server.app import RunDirTakenOver, run_server
from medgen.server.checkpoint import (CheckpointError, checkpoint_for_resume, load_checkpoint,
                                      new_checkpoint, save_checkpoint)
from medgen.server.run_lock import RunLock
from medgen.server.run_log import RunDir, read_metrics
from medgen.server.simulate import NothingTrained, verify_results


class TinyRecipe(Recipe):
    """Two linear layers; only gen.* is shared (like dp-cgan's default)."""

    name: ClassVar[str] = "tiny"
    shared_prefixes: ClassVar[tuple[str, ...]] = ("gen.",)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict({"gen": nn.Linear(3, 2), "disc": nn.Linear(2, 1)})

    def train_local(self, *args, **kwargs):  # not used: the fake grid answers
        raise NotImplementedError

    def sample(self, model, label_maps, site_index, generator=None):
        raise NotImplementedError


class FakeGrid:
    """Answers train messages in-process: every site adds 1.0 to every shared weight."""

    def __init__(self, fail_at_round: int | None = None, refuse_from: int | None = None):
        self.rounds_seen: list[int] = []
        self.run_keys: set[str] = set()
        self.fail_at_round = fail_at_round
        self.refuse_from = refuse_from  # from this round on, every site's budget is spent

    def get_node_ids(self):
        return [101, 102]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            config = msg.content["config"]
            round_ = int(config["absolute-round"])
            if round_ == self.fail_at_round:
                raise RuntimeError("coordinator crashed")
            self.rounds_seen.append(round_)
            self.run_keys.add(str(config["run-key"]))
            if self.refuse_from is not None and round_ >= self.refuse_from:
                replies.append(Message(Error(4001, f"site {'AB'[i]}: refused to train, its privacy "
                                             "budget would be exceeded (see the node log)"), reply_to=msg))
                continue
            state = msg.content["arrays"].to_torch_state_dict()
            arrays = ArrayRecord({k: v + 1.0 for k, v in state.items()})
            replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
                {"num-examples": 5, "site-index": i, "epsilon": 0.5 * round_, "delta": 1e-5})}),
                reply_to=msg))
        return replies


@pytest.fixture
def tiny_recipe(monkeypatch):
    monkeypatch.setattr("medgen.models.registry.build_recipe", lambda config: TinyRecipe(config))
    monkeypatch.setattr("medgen.server.app.build_recipe", lambda config: TinyRecipe(config))


def _config(tmp_path, rounds: int) -> RunConfig:
    return RunConfig(recipe="tiny", num_rounds=rounds, sites="A,B", eval_every=0,
                     run_dir=str(tmp_path / "run"), min_sites=2)


def test_crash_mid_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    config = _config(tmp_path, 2)
    old = {"gen.weight": torch.ones(2, 3)}
    save_checkpoint(tmp_path, new_checkpoint(old, 1, config, "key"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, new_checkpoint({"gen.weight": torch.zeros(2, 3)}, 2, config, "key"))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 1 and torch.equal(loaded.shared_state["gen.weight"], old["gen.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no torn temp files


def test_mismatching_config_is_refused(tmp_path):
    config = _config(tmp_path, 2)
    save_checkpoint(tmp_path, new_checkpoint({"gen.weight": torch.ones(1)}, 1, config, "key"))
    # more rounds is fine (that is what resuming is for)...
    assert checkpoint_for_resume(tmp_path, config.replace(num_rounds=5)).server_round == 1
    # ...a different model or privacy plan is not
    with pytest.raises(CheckpointError, match="different configuration"):
        checkpoint_for_resume(tmp_path, config.replace(image_size=32))
    assert checkpoint_for_resume(tmp_path, config.replace(resume=False)) is None


def test_resume_runs_only_the_remaining_rounds(tmp_path, tiny_recipe, flower_task_identity):
    initial = TinyRecipe(_config(tmp_path, 2)).build().state_dict()["gen.weight"].clone()
    first = FakeGrid()
    run_server(first, _config(tmp_path, 2))
    run_dir = RunDir(tmp_path / "run")
    assert first.rounds_seen == [1, 1, 2, 2]
    assert load_checkpoint(run_dir.path).server_round == 2
    assert run_dir.read_done()["status"] == "ok"

    second = FakeGrid()
    run_server(second, _config(tmp_path, 3))
    checkpoint = load_checkpoint(run_dir.path)
    assert second.rounds_seen == [3, 3]                       # only round 3 ran
    assert checkpoint.server_round == 3
    assert second.run_keys == first.run_keys                  # same run key: replays recognisable
    # continued from the saved weights: initial + 1 per round (a restart from scratch gives +1)
    torch.testing.assert_close(checkpoint.shared_state["gen.weight"], initial + 3.0)
    assert "disc.weight" not in checkpoint.shared_state      # local-only weights never stored
    rounds = [r["round"] for r in read_metrics(run_dir.metrics) if r["kind"] == "train"]
    assert rounds == [1, 2, 3]


def test_crash_mid_run_keeps_last_good_checkpoint_and_marks_failure(tmp_path, tiny_recipe,
                                                                    flower_task_identity):
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        run_server(FakeGrid(fail_at_round=3), _config(tmp_path, 4))
    run_dir = RunDir(tmp_path / "run")
    assert load_checkpoint(run_dir.path).server_round == 2
    done = run_dir.read_done()
    assert done["status"] == "failed" and "coordinator crashed" in done["error"]


def test_resume_after_crash_reports_each_round_once(tmp_path, tiny_recipe, flower_task_identity):
    with pytest.raises(RuntimeError):
        run_server(FakeGrid(fail_at_round=3), _config(tmp_path, 4))
    run_dir = RunDir(tmp_path / "run")
    # round 3 was logged, then the coordinator died before its checkpoint was written
    run_dir.log_train(3, {"A": {"epsilon": 9.0}}, [], {"epsilon": 9.0})
    second = FakeGrid()
    run_server(second, _config(tmp_path, 4))
    assert second.rounds_seen == [3, 3, 4, 4]
    train = [r for r in read_metrics(run_dir.metrics) if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2, 3, 4]
    assert train[2]["per_site"]["A"]["epsilon"] == 1.5  # the re-run round, not the lost one


def test_rounds_that_train_nobody_keep_the_trained_checkpoint(tmp_path, tiny_recipe, flower_task_identity):
    """Issue 13: every site refused rounds 5-6 (budget spent); the checkpoint used to be
    relabelled round 6 while holding round-4 weights, and the run reported success."""
    initial = TinyRecipe(_config(tmp_path, 6)).build().state_dict()["gen.weight"].clone()
    config = _config(tmp_path, 6)
    run_server(FakeGrid(refuse_from=5), config)
    run_dir = RunDir(tmp_path / "run")
    checkpoint = load_checkpoint(run_dir.path)
    assert checkpoint.server_round == 4                       # the last round that trained
    torch.testing.assert_close(checkpoint.shared_state["gen.weight"], initial + 4.0)
    done = run_dir.read_done()
    assert done["status"] == "ok" and done["final_round"] == 4 and done["untrained_rounds"] == [5, 6]
    with pytest.raises(NothingTrained) as refused:
        verify_results(run_dir, done, config, 1.0)
    assert str(refused.value) == ("no site trained in rounds 5-6: budget exhausted at every site (A, B); "
                                  "the checkpoint stays at round 4, the last round that trained")
    assert refused.value.result.final_round == 4

    # a rerun retries the untrained rounds from the round-4 weights, still one line per round
    again = FakeGrid(refuse_from=5)
    run_server(again, config)
    assert again.rounds_seen == [5, 5, 6, 6]
    assert load_checkpoint(run_dir.path).server_round == 4
    rounds = [r["round"] for r in read_metrics(run_dir.metrics) if r["kind"] == "train"]
    assert rounds == [1, 2, 3, 4, 5, 6]


def test_a_crash_in_round_one_resumes_with_the_same_run_key(tmp_path, tiny_recipe, flower_task_identity):
    # round 0 saves the initial weights and the run key: the sites recognise the replayed
    # round 1 (same key, same weights) and do not charge their ledgers twice
    first = FakeGrid(fail_at_round=1)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        run_server(first, _config(tmp_path, 2))
    crashed = load_checkpoint(tmp_path / "run")
    assert crashed.server_round == 0
    second = FakeGrid()
    run_server(second, _config(tmp_path, 2))
    assert second.run_keys == {crashed.run_key}
    assert load_checkpoint(tmp_path / "run").server_round == 2


def test_resume_false_keeps_the_previous_checkpoint_aside(tmp_path, tiny_recipe, flower_task_identity):
    run_server(FakeGrid(), _config(tmp_path, 2))
    trained = load_checkpoint(tmp_path / "run")
    run_server(FakeGrid(refuse_from=1), _config(tmp_path, 2).replace(resume=False))
    kept = list((tmp_path / "run").glob("checkpoint.replaced-*.pt"))
    assert len(kept) == 1
    assert torch.load(kept[0], weights_only=True)["server_round"] == 2
    assert torch.equal(torch.load(kept[0], weights_only=True)["shared_state"]["gen.weight"],
                       trained.shared_state["gen.weight"])
    assert load_checkpoint(tmp_path / "run").server_round == 0  # the new run trained nothing


def test_a_server_app_stops_when_another_coordinator_owns_the_run_dir(tmp_path, tiny_recipe,
                                                                      flower_task_identity):
    lock = RunLock(tmp_path / "run")
    lock.acquire("new-owner")
    try:
        with pytest.raises(RunDirTakenOver, match="new-owner"):
            run_server(FakeGrid(), _config(tmp_path, 2).replace(coordinator_id="old-owner"))
        assert not (tmp_path / "run" / "DONE").exists() and load_checkpoint(tmp_path / "run") is None
        run_server(FakeGrid(), _config(tmp_path, 2).replace(coordinator_id="new-owner"))
        assert RunDir(tmp_path / "run").read_done("new-owner")["final_round"] == 2
        assert RunDir(tmp_path / "run").read_done("old-owner") is None
    finally:
        lock.release()
