"""Per-round cost of Flower's deployment engine against its simulation engine, same work.

The same tiny federation (2 sites, 32 px, 2 local steps per round, rdp accountant, no
evaluation) is trained for ROUNDS rounds three times in one run: with ``medgen-server
simulate``'s harness (one SuperLink in simulation mode, Ray actors that stay alive between
rounds), and on the deployment engine exactly as docs/deployment.md runs it (TLS
SuperLink with SuperNode auth and a database, 2 hospitals started with ``medgen-client``,
every message a fresh ``flwr-clientapp`` process), once with ``--trainer cold`` (the round
runs in that process) and once with ``--trainer warm`` (that process forwards the round
to the hospital's long-lived trainer, client/worker.py). Where the time goes is measured
separately, per component:

- ``start``: SuperLink until its port opens; SuperNodes until the SuperLink lists them online;
- ``process + imports``: a fresh Python process importing what the per-message
  ``flwr-clientapp`` imports: Flower's own runtime alone (the floor), the warm path (plus
  the lean ClientApp), the cold path (plus the rounds: torch, MONAI, Opacus, the recipe),
  and what it imported before this bench's issue (the FAB shim also imported the ServerApp);
- ``data_load``: ``load_site`` from the warm tensor cache (every message in deployment);
- ``training``: the sites' own ``seconds`` metric (local DP training, both engines);
- ``aggregation``: ``weighted_average`` over the sites' replies on the coordinator.

- ``engine``: the rest of a steady round: Flower's polling loops (the ServerApp pulls
  replies every 3 s, an idle SuperNode pulls every 3 s, the SuperNode's SuperExec polls
  every 0.25 s: medgen-client sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL, Flower's default 1 s), process
  spawning, transport, and the sites competing for the same cores.

Round time = the interval between consecutive train records in metrics.jsonl (round 1:
from submission). ``flower_timeline`` (bench/flower_timeline.py) splits each deployed round
along the message's path from Flower's own log timestamps (every process runs with
``FLWR_LOG_LEVEL=DEBUG``, which adds them): the SuperNode's idle pull wait, the SuperExec
poll + flwr-clientapp start + imports, the ClientApp's run (warm: forward + the trainer's
round), the SuperNode's reply wait, the ServerApp's reply-poll wait. ``cpu_s``: CPU seconds
of all the engine's processes (/proc, sampled), per steady round: on a loaded machine the
wall times stretch, the CPU less so. Run by hand:
``nice -n 5 .venv/bin/python -m bench.deployment_overhead [--rounds 4] [--trainers warm]``
-> bench/results/deployment_overhead.json. The machine is shared: the load average at
start and end is recorded, absolute numbers move with it, the differences less so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from bench.common import write_result
from bench.flower_timeline import ProcessCPU, round_breakdown, summary
from medgen.config import RunConfig
from medgen.deploy import pki
from medgen.deploy.launch import (FlwrClient, OwnedProcess, ServerCerts, ServerState, control_address,
                                  flower_env, superlink_command, wait_for_port)
from medgen.server.run_log import read_metrics
from medgen.server.simulate import free_port, run_simulation, write_app_dir

ROUNDS, SITES = 4, ("A", "B")
MARKER = "MEDGEN_BENCH_PROCESS_MARK"  # in every engine process's environment (ProcessCPU)
OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}
FLOWER_RUNTIME = "import flwr.supernode.cli.flwr_clientapp"
PER_MESSAGE_IMPORTS = {  # what each flwr-clientapp process imports (the shim asks for client_app)
    "flower_runtime_only_s": FLOWER_RUNTIME,
    "warm_path_s": f"{FLOWER_RUNTIME}, medgen.client.app",
    "cold_path_s": f"{FLOWER_RUNTIME}, medgen.client.app, medgen.client.rounds",
    "before_issue_19_s": f"{FLOWER_RUNTIME}, medgen.client.rounds, medgen.server.app",
}


def _config(data: Path, work: Path, name: str, rounds: int = ROUNDS) -> RunConfig:
    return RunConfig(recipe="dp-cgan", sites=",".join(SITES), min_sites=len(SITES), num_rounds=rounds,
                     local_steps=2, batch_size=2, image_size=32, accountant="rdp", target_epsilon=8.0,
                     eval_every=0, round_timeout=600.0, data_root=str(data),
                     state_root=str(work / name / "state"), run_dir=str(work / name / "run"),
                     options=OPTIONS)


def _round_ends(run_dir: Path) -> list[float]:
    return [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def _round_times(run_dir: Path, started: float) -> list[float]:
    stamps = _round_ends(run_dir)
    return [b - a for a, b in zip([started, *stamps], stamps)]


def _steady_cpu(cpu: ProcessCPU, ends: list[float]) -> float | None:
    """CPU seconds of the engine's processes per steady round (rounds 2..N)."""
    if len(ends) < 2 or cpu.at(ends[0]) is None or cpu.at(ends[-1]) is None:
        return None
    return (cpu.at(ends[-1]) - cpu.at(ends[0])) / (len(ends) - 1)


def _site_seconds(run_dir: Path) -> list[float]:
    return [m["seconds"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"
            for m in r["per_site"].values() if isinstance(m.get("seconds"), (int, float))]


def run_simulated(config: RunConfig, work: Path) -> dict:
    started = time.time()
    with ProcessCPU(os.environ[MARKER]) as cpu:
        result = run_simulation(config, work / "sim" / "flower", progress=lambda line: None)
    rounds = _round_times(Path(config.run_dir), started)
    return {"total_s": result.seconds, "round_s": rounds, "train_s": _site_seconds(Path(config.run_dir)),
            "cpu_s_total": cpu.total(), "cpu_s_per_steady_round": _steady_cpu(cpu, _round_ends(Path(config.run_dir)))}


def run_deployed(config: RunConfig, work: Path, trainer: str, keep_logs: Path | None = None) -> dict:
    """The federation on the deployment engine, hospitals started with ``medgen-client
    --trainer TRAINER`` (the commands docs/deployment.md gives)."""
    from medgen.server.deploy_cli import submit_and_wait

    root = work / f"deploy-{trainer}"
    pki.create_ca(root / "pki" / "ca", "bench CA")
    pki.create_server_cert(root / "pki" / "ca", root / "pki" / "server")
    certs = ServerCerts.from_dir(root / "pki" / "server", root / "pki" / "ca" / "ca.crt")
    state, port = ServerState(root / "server-state"), free_port()
    state.root.mkdir(parents=True)
    state.write_connection(control_address("127.0.0.1", port), certs.ca_cert)
    processes: list[OwnedProcess] = []
    timings: dict[str, float] = {}
    cpu = ProcessCPU(os.environ[MARKER]).__enter__()
    try:
        start = time.perf_counter()
        link = OwnedProcess(superlink_command(certs, state, "127.0.0.1", port), root / "superlink.log",
                            env=flower_env(state.flwr_home)).start()
        processes.append(link)
        wait_for_port("127.0.0.1", port, 120, link)
        timings["superlink_start_s"] = time.perf_counter() - start
        client = FlwrClient(state)
        start = time.perf_counter()
        for site in SITES:
            key = pki.create_node_key(root / "keys", f"site-{site}")
            client.register(key.public_key)
            command = [str(Path(sys.executable).parent / "medgen-client"), "--server", f"127.0.0.1:{port}",
                       "--data", f"{config.data_root}/sites/{site}", "--public", f"{config.data_root}/public",
                       "--state", f"{config.state_root}/{site}", "--key", str(key.private_key),
                       "--ca", str(certs.ca_cert), "--site", site, "--port", str(free_port()),
                       "--trainer", trainer]
            processes.append(OwnedProcess(command, root / f"node-{site}.log").start())
        if client.wait_online(len(SITES), 300) < len(SITES):
            raise RuntimeError(f"the SuperNodes did not come online; see {root}")
        timings["supernodes_online_s"] = time.perf_counter() - start
        app_dir = write_app_dir(config, state.apps / "run")
        started = time.time()
        result = submit_and_wait(client, app_dir, config, timeout=1800, progress=lambda line: None)
        rounds = _round_times(Path(config.run_dir), started)
        ends = _round_ends(Path(config.run_dir))
        try:
            timeline = round_breakdown(root / "superlink.log", {s: root / f"node-{s}.log" for s in SITES},
                                       ends, started)
        except (OSError, ValueError, KeyError) as err:  # the round times above still stand
            timeline = [{"error": f"{type(err).__name__}: {err}"}]
        if keep_logs is not None:
            for log_path in [root / "superlink.log", *(root / f"node-{s}.log" for s in SITES)]:
                target = Path(keep_logs) / trainer / log_path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log_path, target)
        return {"trainer": trainer, "total_s": result.seconds, "round_s": rounds,
                "train_s": _site_seconds(Path(config.run_dir)), **timings,
                "cpu_s_total": cpu.total(), "cpu_s_per_steady_round": _steady_cpu(cpu, ends),
                "flower_timeline": timeline,
                "flower_timeline_steady_median": summary(timeline[1:]) if "error" not in timeline[0] else None}
    finally:
        for process in reversed(processes):
            process.stop()
        cpu.__exit__(None, None, None)


def per_message_import_s(repeats: int = 2) -> dict[str, list[float]]:
    """A fresh interpreter importing what each kind of flwr-clientapp process imports."""
    out: dict[str, list[float]] = {}
    for name, statement in PER_MESSAGE_IMPORTS.items():
        out[name] = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env=flower_env())
            out[name].append(time.perf_counter() - start)
    return out


def data_load_s(config: RunConfig, repeats: int = 3) -> list[float]:
    from medgen.data.site_data import load_public_bank, load_site

    site = SITES[0]
    cache = Path(config.state_root) / site / "cache"
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_site(Path(config.data_root) / "sites" / site, config.image_size, cache_dir=cache)
        load_public_bank(Path(config.data_root) / "public", config.image_size)
        out.append(time.perf_counter() - start)
    return out


def aggregation_s(config: RunConfig, repeats: int = 5) -> list[float]:
    from flwr.app import ArrayRecord

    from medgen.models.registry import build_recipe
    from medgen.server.strategy import AcceptedReply, specs_of, weighted_average

    recipe = build_recipe(config)
    shared = {k: v.numpy() for k, v in recipe.shared_state(recipe.build()).items()}
    specs = specs_of(ArrayRecord(recipe.shared_state(recipe.build())))
    replies = [AcceptedReply(s, 6.0, shared, {}) for s in SITES]
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        weighted_average(replies, specs)
        out.append(time.perf_counter() - start)
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def where_the_time_goes(simulated: dict, deployed: dict, components: dict) -> dict:
    """Split a steady deployment round (median of rounds 2..N) into measured parts.

    Sites run in parallel, so a round costs about one site's per-message process start and
    imports + data load + training (the slowest site's), plus the aggregation; the rest is
    the engine itself: Flower's polling loops, process spawning, transport (including the
    warm path's socket hop) and the sites competing for the same cores (the imports were
    timed alone).
    """
    warm = deployed["trainer"] == "warm"
    round_s = _median(deployed["round_s"][1:])
    per_round = len(deployed["train_s"]) // max(1, len(deployed["round_s"]))
    train = [max(deployed["train_s"][i:i + per_round]) for i in range(0, len(deployed["train_s"]), per_round)]
    imports = components["per_message_imports_s"]["warm_path_s" if warm else "cold_path_s"]
    parts = {"process_start_and_imports_s": _median(imports),
             "data_load_s": _median(components["data_load_s"]),
             "training_slowest_site_s": _median(train[1:]) if len(train) > 1 else None,
             "aggregation_s": _median(components["aggregation_s"])}
    known = sum(v for v in parts.values() if v is not None)
    return {"round_s": round_s, **parts,
            "engine_polling_spawning_transport_s": round_s - known if round_s is not None else None,
            "sites_in_parallel": len(SITES)}


def main(argv: list[str] | None = None) -> None:
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--trainers", nargs="+", default=["cold", "warm"], choices=("cold", "warm"))
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the Flower logs here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ[MARKER] = uuid.uuid4().hex
    os.environ["FLWR_LOG_LEVEL"] = "DEBUG"  # Flower's only switch for log timestamps (flower_timeline)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medgen-bench-deploy-") as tmp:
        work = Path(tmp)
        data = work / "data"
        build_federation(SimConfig(seed=0, sites=",".join(SITES), subjects_per_site=6, public_size=6,
                                   heldout_fit=4, heldout_test=4, image_size=32), data)
        simulated = run_simulated(_config(data, work, "sim", args.rounds), work)
        deployed = {trainer: run_deployed(_config(data, work, f"deploy-{trainer}", args.rounds), work, trainer,
                                          args.keep_logs)
                    for trainer in args.trainers}
        components = {"per_message_imports_s": per_message_import_s(),
                      "data_load_s": data_load_s(_config(data, work, "deploy-warm")),
                      "aggregation_s": aggregation_s(_config(data, work, "deploy-warm"))}
    steady = {"simulation": _median(simulated["round_s"][1:]),
              **{f"deployment_{k}": _median(v["round_s"][1:]) for k, v in deployed.items()}}
    sim_round = steady["simulation"]
    write_result("deployment_overhead", {
        "command": "python -m bench.deployment_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "sites": len(SITES), "image_size": 32, "local_steps": 2,
        "transport": "127.0.0.1, TLS (federation CA), SuperNode authentication (registered ECDSA keys)",
        "simulation": simulated, **{f"deployment_{k}": v for k, v in deployed.items()},
        "components_median_s": {"per_message_imports_s": {k: _median(v) for k, v in
                                                          components["per_message_imports_s"].items()},
                                "data_load_s": _median(components["data_load_s"]),
                                "aggregation_s": _median(components["aggregation_s"])},
        "components_runs_s": components,
        "steady_round_median_s": steady,
        "steady_overhead_vs_simulation_s": {k: v - sim_round for k, v in steady.items()
                                            if k != "simulation" and v is not None and sim_round},
        "first_round_s": {"simulation": simulated["round_s"][0],
                          **{f"deployment_{k}": v["round_s"][0] for k, v in deployed.items()}},
        "where_the_time_goes": {k: where_the_time_goes(simulated, v, components) for k, v in deployed.items()},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "note": "steady rounds = rounds 2..N (round 1 includes app start-up and plan calibration). "
                "Both deployments start a fresh flwr-clientapp process per message (Flower's design). "
                "Cold: that process imports the rounds (torch, MONAI, Opacus, the recipe) and trains. "
                "Warm: it imports Flower and the lean ClientApp only and forwards the round over a Unix "
                "socket to the hospital's long-lived trainer. Simulation keeps Ray actors alive. The "
                "floor of a deployed round is Flower's: the ServerApp pulls replies every 3 s, an idle "
                "SuperNode pulls messages every 3 s, the SuperNode's SuperExec polls every 0.25 s "
                "(medgen-client's FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's default 1 s), plus one fresh process "
                "importing Flower's runtime per message. 2 shared CPU cores: read the load averages "
                "with the times.",
    })


if __name__ == "__main__":
    main()
