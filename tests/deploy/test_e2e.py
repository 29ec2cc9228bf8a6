"""medgen on Flower's deployment engine, end to end, with real processes on 127.0.0.1.

The commands are the ones docs/deployment.md gives a coordinator and a hospital:
``medgen-server pki ...``, ``medgen-server start``, ``medgen-server register-node``,
``medgen-client ...``, ``medgen-server run``. Every process is an ``OwnedProcess`` (own
session, descendants remembered) and is stopped by PID in the fixture's teardown, also
when a test fails.

Every hospital runs the warm path (``medgen-client``'s default ``--trainer warm``): each
message's ClientApp forwards the round to the hospital's long-lived trainer
(client/worker.py). One federation serves all tests: the negative tests first (plaintext,
unregistered key), then one training run that exercises dropout, the allow-list, the
epsilon cap, a crash of a hospital's trainer mid-run (medgen-client restarts it, the round
is answered and charged once), a server restart with resume, and a rejoin, and ends with
federated evaluation: each site scores the final
global generator on its own reserved patients and returns DP-released scalars, each release
in its ledger (docs/evaluation.md, "Federated evaluation").
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medgen.deploy.launch import FlwrClient, OwnedProcess, ServerState, wait_for_port
from medgen.server.simulate import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SITES = ("A", "B", "C")
RUN_TOML = """\
recipe = "dp-cgan"
sites = "A,B,C"
min-sites = 1
num-rounds = 3
local-steps = 2
batch-size = 2
image-size = 32
accountant = "rdp"
target-epsilon = 8.0
eval-every = 0
round-timeout = 900.0
federated-eval-fraction = 0.5
federated-eval-noise = 6.0

[options]
gen-width = 4
disc-width = 4
noise-dim = 8
spade-hidden = 4
"""
ALLOW_OK = 'medgen-version = "{version}"\nrecipes = ["dp-cgan"]\n[ranges]\nnum-rounds = {{ max = 10 }}\n'
ALLOW_PRV_ONLY = 'medgen-version = "{version}"\nrecipes = ["dp-cgan"]\n[fixed]\naccountant = "prv"\n'
B_CAP = 2.5
# generous: a round is ~30 s on an idle 2-core machine, several minutes when it is shared
ROUND_TIMEOUT = 600


def _cli(name: str, *args: str) -> list[str]:
    return [str(BIN / name), *map(str, args)]


def _medgen_server(*args: str) -> str:
    """``medgen-server ARGS`` for the set-up commands (pki, register-node), in this process:
    the same ``main`` and argument parsing as the console script, without a Python start
    that imports torch (~6 s of CPU each, 9 of them before the first test). The server,
    the hospitals and the runs stay real processes."""
    from medgen.server.cli import main

    printed, sigterm = io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() turns SIGTERM into SystemExit
    assert code == 0, f"medgen-server {' '.join(map(str, args[:2]))} failed: {printed.getvalue()}"
    return printed.getvalue()


def _wait(predicate, timeout: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            process.running()  # remember new descendants (serverapp/clientapp processes)
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Federation:
    root: Path
    data: Path
    pki: Path
    keys: Path
    state: ServerState
    port: int
    processes: list[OwnedProcess] = field(default_factory=list)
    link: OwnedProcess | None = None

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca" / "ca.crt"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def own(self, command: list[str], log: str) -> OwnedProcess:
        process = OwnedProcess(command, self.root / "logs" / log).start()
        self.processes.append(process)
        return process

    def start_server(self) -> OwnedProcess:
        # docs/deployment.md, coordinator step 2
        self.link = self.own(_cli("medgen-server", "start", "--certs", self.pki / "server", "--ca",
                                  self.ca_cert, "--state", self.state.root, "--host", "127.0.0.1",
                                  "--port", self.port),
                             "superlink.log")
        wait_for_port("127.0.0.1", self.port, 90, self.link)
        return self.link

    def start_hospital(self, site: str, *extra: str, key: str | None = None) -> OwnedProcess:
        # docs/deployment.md, hospital step 3
        return self.own(_cli("medgen-client", "--server", self.server, "--data",
                             self.data / "sites" / site, "--public", self.data / "public",
                             "--state", self.root / "hospitals" / site, "--key",
                             self.keys / (key or f"site-{site}"), "--ca", self.ca_cert,
                             "--site", site, "--port", free_port(), *extra),
                        f"node-{site}-{len(self.processes)}.log")

    def ledger(self, site: str) -> dict:
        path = self.root / "hospitals" / site / "privacy_ledger.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    import torch

    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deploy")
    data = root / "data"
    build_federation(SimConfig(seed=0, sites=",".join(SITES), subjects_per_site=8, public_size=4,
                               heldout_fit=2, heldout_test=2, image_size=32), data)
    pki, keys = root / "pki", root / "keys"
    # docs/deployment.md, coordinator step 1 and hospital step 1
    _medgen_server("pki", "ca", "--out", pki / "ca")
    _medgen_server("pki", "server-cert", "--ca", pki / "ca", "--out", pki / "server",
                   "--host", "localhost", "--host", "127.0.0.1")
    for name in [f"site-{s}" for s in SITES] + ["intruder"]:
        _medgen_server("pki", "node-key", "--out", keys, "--name", name)
    fed = Federation(root, data, pki, keys, ServerState(root / "server-state"), free_port())
    try:
        fed.start_server()
        for site in SITES:
            _medgen_server("register-node", keys / f"site-{site}.pub", "--state", fed.state.root)
        yield fed
    finally:
        fed.stop_all()
        left = [p.pid for p in fed.processes if p.running()]
        assert not left, f"processes still running after teardown: {left}"


def test_plaintext_connection_is_refused(federation):
    # a client that does not speak TLS gets no answer at all
    connection = http.client.HTTPConnection("127.0.0.1", federation.port, timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, OSError)):
        connection.request("GET", "/")
        connection.getresponse()
    # ... and a TLS client that does not trust the federation's CA refuses the server
    untrusted = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        with untrusted.wrap_socket(__import__("socket").create_connection(("127.0.0.1", federation.port)),
                                   server_hostname="127.0.0.1"):
            pass
    # a SuperNode without TLS cannot join
    node = federation.own(_cli("flower-supernode", "--insecure", "--superlink", federation.server,
                               "--port", free_port(), "--max-retries", "1"), "plaintext-node.log")
    assert node.wait(60) not in (None, 0), "a plaintext SuperNode kept running"
    assert "could not establish a connection" in node.log_text()
    assert FlwrClient(federation.state).online_nodes() == 0


def test_unregistered_node_key_is_refused(federation):
    node = federation.start_hospital("A", "--max-retries", "1", key="intruder")
    assert node.wait(90) not in (None, 0), "a SuperNode with an unregistered key kept running"
    assert "Failed to activate SuperNode" in node.log_text()
    nodes = FlwrClient(federation.state).nodes()
    assert len(nodes) == len(SITES) and all(n["status"] != "online" for n in nodes)
    assert not (federation.root / "hospitals" / "A" / "privacy_ledger.json").exists()


def test_run_survives_dropout_refusal_and_server_restart(federation):
    import medgen

    fed = federation
    (fed.root / "run.toml").write_text(RUN_TOML)
    allow_ok, allow_prv = fed.root / "allow-A.toml", fed.root / "allow-C.toml"
    allow_ok.write_text(ALLOW_OK.format(version=medgen.__version__))
    allow_prv.write_text(ALLOW_PRV_ONLY.format(version=medgen.__version__))
    run_dir = fed.root / "run"
    run_command = _cli("medgen-server", "run", "--config", fed.root / "run.toml", "--state",
                       fed.state.root, "--out", run_dir)
    metrics = run_dir / "metrics.jsonl"

    def train_records() -> list[dict]:
        if not metrics.exists():
            return []
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("kind") == "train"]

    def checkpoint_round() -> int:
        sidecar = run_dir / "checkpoint.json"
        return json.loads(sidecar.read_text())["server_round"] if sidecar.exists() else 0

    flwr = FlwrClient(fed.state)
    hospitals = {"A": fed.start_hospital("A", "--allow", allow_ok),
                 "B": fed.start_hospital("B", "--epsilon-cap", B_CAP),
                 "C": fed.start_hospital("C", "--allow", allow_prv)}
    _wait(lambda: flwr.online_nodes() == 3, 120, "3 hospitals online", hospitals.values())
    runner = fed.own(run_command, "run-1.log")
    watched = [fed.link, runner, *hospitals.values()]

    # round 1: A and B train, C refuses at the hospital (allow-list); B drops out mid-round 2
    _wait(lambda: len(train_records()) >= 1, ROUND_TIMEOUT, "round 1", watched)
    _wait(lambda: hospitals["B"].log_text().count("Receiving: train message") >= 2, ROUND_TIMEOUT,
          "round 2 to reach B", watched)
    hospitals["B"].stop()  # SIGTERM: the node leaves; its pending message errors at once
    # A's warm trainer crashes during round 2; medgen-client starts a new one and A's
    # waiting ClientApp gets round 2 answered by it (charged once: asserted below)
    trainer_pid = int((fed.root / "hospitals" / "A" / "trainer.pid").read_text())
    os.kill(trainer_pid, signal.SIGKILL)
    # round 2 goes on without B. Round 3 is sent; once A's SuperNode holds the whole message
    # (its 3rd "Received successfully"), the coordinator crashes
    _wait(lambda: checkpoint_round() >= 2, ROUND_TIMEOUT, "round 2's checkpoint", watched)
    _wait(lambda: hospitals["A"].log_text().count("Received successfully") >= 3, ROUND_TIMEOUT,
          "round 3 to reach A", watched)
    fed.link.stop()
    runner.stop()
    assert checkpoint_round() == 2
    # A finishes round 3 on its own and keeps its reply; the coordinator never got it
    _wait(lambda: len(fed.ledger("A")["rounds"]) == 3 and
          len(list((fed.root / "hospitals" / "A" / "replies").glob("*.pt"))) == 3,
          ROUND_TIMEOUT, "A to finish round 3", hospitals.values())
    restarted_at = time.time()
    ledger_a_before_restart = fed.ledger("A")

    # B rejoins, the server restarts on the same database, the same command resumes
    hospitals["B"] = fed.start_hospital("B", "--epsilon-cap", B_CAP)
    fed.start_server()
    _wait(lambda: flwr.online_nodes() == 3, 180, "3 hospitals back online",
          [fed.link, *hospitals.values()])
    resumed = fed.own(run_command, "run-2.log")
    assert resumed.wait(2 * ROUND_TIMEOUT) == 0, resumed.log_text()[-3000:]

    records = train_records()
    assert [r["round"] for r in records] == [1, 2, 3], records   # no round lost or repeated
    assert sorted(records[0]["per_site"]) == ["A", "B"]
    assert sorted(records[1]["per_site"]) == ["A"]                # B dropped out
    assert sorted(records[2]["per_site"]) == ["A", "B"]           # B rejoined after the restart
    for record in records:
        reasons = " ".join(e["reason"] for e in record["excluded"])
        assert "allow-list" in reasons and "accountant" in reasons, record["excluded"]
    assert checkpoint_round() == 3
    done = json.loads((run_dir / "DONE").read_text())
    assert done["status"] == "ok" and done["final_round"] == 3
    log_a = hospitals["A"].log_text()   # the warm path trained A's rounds, and survived the crash
    assert "warm trainer ready" in log_a and "train request received (round 1)" in log_a
    assert f"the warm trainer (pid {trainer_pid}) exited" in log_a, log_a[-3000:]
    resumed_log = resumed.log_text()   # the resumed run trained round 3 only
    assert "round 3/3 train" in resumed_log and "round 1/3" not in resumed_log and \
        "round 2/3" not in resumed_log, resumed_log

    # per-site ledgers: charged once per round trained, never twice for a round
    def training(entries: list[dict]) -> list[dict]:
        return [e for e in entries if not e["run_id"].startswith("eval:")]

    charged = {site: [e["server_round"] for e in training(fed.ledger(site).get("rounds", []))
                      if e["steps"] > 0] for site in SITES}
    assert charged["A"] == [1, 2, 3], charged
    assert charged["B"] == [1, 3], charged
    assert charged["C"] == [] and not (fed.root / "hospitals" / "C" / "privacy_ledger.json").exists()
    assert fed.ledger("B")["plan"]["target_epsilon"] == pytest.approx(B_CAP)   # the site's cap wins
    assert fed.ledger("A")["plan"]["target_epsilon"] == pytest.approx(8.0)
    # A answered round 3 before the restart; after it, the identical request was replayed
    assert training(fed.ledger("A")["rounds"]) == ledger_a_before_restart["rounds"]
    assert [e for e in ledger_a_before_restart["rounds"] if e["server_round"] == 3][0]["committed_at"] \
        < restarted_at
    for site, rounds in charged.items():
        for r in records:
            if site in r["per_site"]:
                assert r["per_site"][site]["epsilon"] == pytest.approx(
                    [e for e in training(fed.ledger(site)["rounds"]) if e["server_round"] == r["round"]][-1]["epsilon"])

    # federated evaluation after the final round: A and B score the global generator on their
    # own reserved patients; C refuses at the hospital (allow-list), as for training
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in lines if r.get("kind") == "federated-eval"]
    assert [r["round"] for r in evaluations] == [3], evaluations
    scores = evaluations[0]["per_site"]
    assert sorted(scores) == ["A", "B"], evaluations
    assert "allow-list" in " ".join(e["reason"] for e in evaluations[0]["excluded"])
    assert json.loads((run_dir / "federated_eval.json").read_text())["3"]["per_site"] == scores
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in ("A", "B"):
        ledger = fed.ledger(site)
        releases = [e for e in ledger["rounds"] if e["run_id"].startswith("eval:")]
        assert len(releases) == 1 and releases[0]["server_round"] == 3 and releases[0]["steps"] == 1
        assert ledger["history"][-1] == [6.0, 1.0, 1]        # the Gaussian release, accounted
        assert [6.0, 1.0, 1] in ledger["plan"]["releases"]   # ... and planned into the budget
        assert scores[site]["epsilon"] == pytest.approx(releases[0]["epsilon"])
        assert scores[site]["epsilon"] <= ledger["plan"]["target_epsilon"] + 1e-6
        assert privacy["reported_by_sites"][site]["epsilon"] == pytest.approx(scores[site]["epsilon"])
        for key in ("fed-tissue-bands", "fed-tissue-bands-floor", "fed-tissue-bands-sd"):
            assert scores[site][key] > 0, scores[site]
    print("federated evaluation, round 3:", json.dumps(scores, sort_keys=True))
