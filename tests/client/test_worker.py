"""The warm trainer (client/worker.py) behind the per-message ClientApp (client/app.py).

Real processes: a trainer started the way medgen-client starts it (client/worker_supervisor.py
``TrainerProcess``), the ClientApp called directly with a deployment node-config whose
``trainer = "warm"``. What each test catches when the mechanism is removed is in its
docstring (tried for the in-process tests; for the others it follows from the assertion).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medgen.client.app import TRAINING_FAILED, app
from medgen.client.worker import handle
from medgen.client.worker_channel import TRAINER_KEY, WARM, ask, socket_path
from medgen.client.worker_supervisor import TrainerProcess
from medgen.config import RunConfig
from medgen.deploy.allowlist import NOT_ALLOWED
from medgen.deploy.launch import flower_env, node_config_toml
from medgen.models.registry import build_recipe
from medgen.privacy.message_audit import OUTBOX_FILE

OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}
READY_S = 300  # the trainer imports torch first; minutes when the 2 cores are shared


def _config(num_rounds: int = 3) -> RunConfig:
    return RunConfig(num_rounds=num_rounds, local_steps=2, batch_size=2, image_size=32, sites="A,B",
                     accountant="rdp", eval_every=0, target_epsilon=5.0, options=OPTIONS)


def _message(config: RunConfig, server_round: int) -> Message:
    recipe = build_recipe(config)
    content = RecordDict({"arrays": ArrayRecord(recipe.shared_state(recipe.build())),
                          "config": ConfigRecord({"run-key": "run-1", "absolute-round": server_round,
                                                  "server-round": server_round})})
    return Message(content, dst_node_id=7, message_type="train")


def _node_config(federation: Path, state: Path, **extra) -> dict:
    return {"site": "A", "data-dir": str(federation / "sites" / "A"), "state-dir": str(state),
            "public-dir": str(federation / "public"), TRAINER_KEY: WARM, **extra}


def _context(config: RunConfig, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=config.to_run_config())


def _start(federation: Path, state: Path, **extra) -> tuple[TrainerProcess, dict]:
    state.mkdir(parents=True, mode=0o700)
    node_config = _node_config(federation, state, **extra)
    (state / "node-config.toml").write_text(node_config_toml(node_config))  # as medgen-client writes it
    trainer = TrainerProcess(state, flower_env(), log_path=state.parent / f"{state.name}-trainer.log").start()
    deadline = time.monotonic() + READY_S
    while not socket_path(state).exists():
        assert trainer.proc.poll() is None, trainer.log_path.read_text()
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.2)
    return trainer, node_config


def _training_rounds(state: Path) -> list[int]:
    ledger = state / "privacy_ledger.json"
    return [e["server_round"] for e in json.loads(ledger.read_text())["rounds"]] if ledger.exists() else []


@pytest.fixture(scope="module")
def warm_node(tiny_federation, tmp_path_factory):
    state = tmp_path_factory.mktemp("warm") / "A"
    trainer, node_config = _start(tiny_federation, state)
    try:
        yield trainer, node_config
    finally:
        trainer.stop()
    assert not socket_path(state).exists()  # a stopped trainer removes its socket


@pytest.mark.slow
def test_trainer_socket_is_owner_only(warm_node):
    """Mutation: binding without the 0177 umask and chmod leaves the socket 0755 (fails)."""
    trainer, node_config = warm_node
    mode = stat.S_IMODE(os.stat(socket_path(Path(node_config["state-dir"]))).st_mode)
    assert stat.S_ISSOCK(os.stat(socket_path(Path(node_config["state-dir"]))).st_mode)
    assert mode == 0o600, oct(mode)


@pytest.mark.slow
def test_warm_round_is_trained_by_the_trainer_audited_here_and_replayed_free(warm_node, flower_task_identity):
    """The ClientApp forwards; the trainer trains (its log names the round); the reply is the
    recipe's shared weights + scalars, recorded in the outbox by THIS process; the same
    request again is answered from the reply store with no new charge. Mutations: the
    ClientApp training in-process despite ``trainer = "warm"`` (no trainer log line);
    outbox_mod dropped from the train handler (no outbox line); the replay check removed
    from train_round (a second ledger entry)."""
    trainer, node_config = warm_node
    state = Path(node_config["state-dir"])
    config = _config()
    first = app(_message(config, 1), _context(config, node_config))
    assert not first.has_error(), first.error.reason
    assert "train request received (round 1)" in trainer.log_path.read_text()
    recipe = build_recipe(config)
    assert sorted(first.content["arrays"]) == sorted(recipe.shared_keys(recipe.build()))
    assert first.content["metrics"]["steps"] == 2 and first.content["metrics"]["site-index"] == 0
    outbox = [json.loads(line) for line in (state / OUTBOX_FILE).read_text().splitlines()]
    assert len(outbox) == 1
    charged = hashlib.sha256((state / "privacy_ledger.json").read_bytes()).hexdigest()
    again = app(_message(config, 1), _context(config, node_config))
    assert not again.has_error()
    assert hashlib.sha256((state / "privacy_ledger.json").read_bytes()).hexdigest() == charged
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    assert _training_rounds(state) == [1]


@pytest.mark.slow
def test_allow_list_refusal_never_reaches_the_trainer(warm_node, tmp_path, flower_task_identity):
    """Mutation: forwarding before ``enforce_node_allow_list`` (the trainer logs a request
    for round 9 and charges it)."""
    import medgen

    trainer, node_config = warm_node
    allow = tmp_path / "allow.toml"
    allow.write_text(f'medgen-version = "{medgen.__version__}"\nrecipes = ["dp-cgan"]\n'
                     "[ranges]\nnum-rounds = { max = 2 }\n")
    config = _config(num_rounds=9)
    reply = app(_message(config, 9), _context(config, {**node_config, "allow-list": str(allow)}))
    assert reply.has_error() and reply.error.code == NOT_ALLOWED
    assert "round 9" not in trainer.log_path.read_text()
    assert 9 not in _training_rounds(Path(node_config["state-dir"]))


def test_request_for_another_nodes_folders_is_refused(tmp_path, flower_task_identity):
    """The trainer serves only the folders it was started with. Mutation: dropping the
    comparison with its own node-config (the request would train on ``other``'s data)."""
    own = {"site": "A", "data-dir": "/data/A", "state-dir": str(tmp_path), "public-dir": "/data/public"}
    config = _config()
    header = {"verb": "train", "run-config": config.to_run_config(),
              "node-config": {**own, "data-dir": str(tmp_path / "other")}}
    result = handle(header, _message(config, 1).content, own)
    assert result.code == TRAINING_FAILED and "differ" in result.reason
    assert str(tmp_path) not in result.reason


def test_no_trainer_is_a_clean_refusal(tmp_path, flower_task_identity):
    """Two attempts, then a path-free error with the round's failure code (never a hang or
    a traceback). Mutation: raising instead of answering fails this test."""
    config = _config()
    result = ask(tmp_path, "train", config.to_run_config(), {}, _message(config, 1).content,
                 site="A", failed_code=TRAINING_FAILED, ready_timeout=0.5)
    assert result.code == TRAINING_FAILED and "trainer stopped" in result.reason
    assert str(tmp_path) not in result.reason


@pytest.mark.slow
def test_trainer_killed_mid_round_is_restarted_and_the_round_answered_once(tiny_federation, tmp_path,
                                                                            flower_task_identity):
    """SIGKILL the trainer while it holds the round: medgen-client's supervisor starts a new
    one, the waiting ClientApp asks it again and gets a reply; the ledger holds the round
    once (the killed attempt never committed). Mutations: no restart in ``keep_alive`` (the
    round is refused after the wait); no retry in ``ask`` (the round is refused at once)."""
    state = tmp_path / "A"
    trainer, node_config = _start(tiny_federation, state)
    stopping, replies = threading.Event(), []

    def supervise() -> None:  # run_node's loop, without the SuperNode
        while not stopping.wait(0.1):
            trainer.keep_alive()

    keeper = threading.Thread(target=supervise, daemon=True)
    keeper.start()
    try:
        config = _config()
        first_pid = trainer.proc.pid
        asking = threading.Thread(target=lambda: replies.append(
            app(_message(config, 1), _context(config, node_config))))
        asking.start()
        deadline = time.monotonic() + READY_S
        while "train request received (round 1)" not in trainer.log_path.read_text():
            assert time.monotonic() < deadline and asking.is_alive(), trainer.log_path.read_text()
            time.sleep(0.01)
        assert _training_rounds(state) == []          # still inside the round
        os.kill(first_pid, signal.SIGKILL)
        asking.join(2 * READY_S)
        assert not asking.is_alive()
        reply = replies[0]
        assert not reply.has_error(), reply.error.reason
        assert trainer.restarts == 1 and trainer.proc.pid != first_pid
        assert (state / "trainer.pid").read_text().strip() == str(trainer.proc.pid)
        assert _training_rounds(state) == [1]         # charged once
        assert reply.content["metrics"]["steps"] == 2
    finally:
        stopping.set()
        keeper.join(5)
        trainer.stop()


def test_warm_path_refuses_a_state_dir_others_can_write(tmp_path):
    """Another user who can write STATE could plant a socket in the trainer's place.
    Mutation: dropping the mode check in client/cli.py ``node_settings`` (it returns)."""
    from medgen.client.cli import ClientSetupError, build_parser, node_settings

    for name in ("data", "public", "state"):
        (tmp_path / name).mkdir()
    (tmp_path / "ca.crt").write_text("ca")
    (tmp_path / "key").write_text("key")
    (tmp_path / "key").chmod(0o600)
    (tmp_path / "state").chmod(0o777)
    argv = ["--server", "127.0.0.1:9092", "--data", str(tmp_path / "data"), "--public",
            str(tmp_path / "public"), "--state", str(tmp_path / "state"), "--key", str(tmp_path / "key"),
            "--ca", str(tmp_path / "ca.crt"), "--site", "A"]
    with pytest.raises(ClientSetupError, match="chmod 700"):
        node_settings(build_parser().parse_args(argv))
    assert node_settings(build_parser().parse_args([*argv, "--trainer", "cold"]))[TRAINER_KEY] is None
    (tmp_path / "state").chmod(0o700)
    assert node_settings(build_parser().parse_args(argv))[TRAINER_KEY] == WARM
