"""Per-round cost of Flower's deployment engine against its simulation engine, same work.

The same tiny federation (2 sites, 32 px, 2 local steps per round, rdp accountant, no
evaluation) is trained for ROUNDS rounds twice: with ``medgen-server simulate``'s harness
(one SuperLink in simulation mode, Ray actors that stay alive between rounds) and on the
deployment engine exactly as docs/deployment.md runs it (TLS SuperLink with SuperNode
auth and a database, 2 authenticated SuperNodes, every message a fresh ``flwr-clientapp``
process). Where the time goes is measured separately, per component:

- ``start``: SuperLink until its port opens; SuperNodes until the SuperLink lists them online;
- ``imports``: a fresh Python process importing what a ClientApp imports (the per-message
  start-up cost of the deployment engine; simulation pays it once per actor);
- ``data_load``: ``load_site`` from the warm tensor cache (every message in deployment);
- ``training``: the sites' own ``seconds`` metric (local DP training, both engines);
- ``aggregation``: ``weighted_average`` over the sites' replies on the coordinator.

Round time = the interval between consecutive train records in metrics.jsonl (round 1:
from submission). Run by hand: ``.venv/bin/python -m bench.deployment_overhead``
-> bench/results/deployment_overhead.json. The machine is shared: the load average at
start and end is recorded, absolute numbers move with it, the differences less so.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from medgen.config import RunConfig
from medgen.deploy import pki
from medgen.deploy.launch import (FlwrClient, NodeLaunch, OwnedProcess, ServerCerts, ServerState,
                                  control_address, flower_env, node_config_toml, superlink_command,
                                  supernode_command, wait_for_port)
from medgen.server.run_log import read_metrics
from medgen.server.simulate import free_port, run_simulation, write_app_dir

ROUNDS, SITES = 3, ("A", "B")
OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "spade-hidden": 4}
CLIENTAPP_IMPORTS = ("import flwr.clientapp, medgen.client.app, medgen.models.dp_cgan, "
                     "medgen.privacy.dp_sgd, medgen.data.site_data")


def _config(data: Path, work: Path, name: str) -> RunConfig:
    return RunConfig(recipe="dp-cgan", sites=",".join(SITES), min_sites=len(SITES), num_rounds=ROUNDS,
                     local_steps=2, batch_size=2, image_size=32, accountant="rdp", target_epsilon=8.0,
                     eval_every=0, round_timeout=600.0, data_root=str(data),
                     state_root=str(work / name / "state"), run_dir=str(work / name / "run"),
                     options=OPTIONS)


def _round_times(run_dir: Path, started: float) -> list[float]:
    stamps = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    return [b - a for a, b in zip([started, *stamps], stamps)]


def _site_seconds(run_dir: Path) -> list[float]:
    return [m["seconds"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"
            for m in r["per_site"].values() if isinstance(m.get("seconds"), (int, float))]


def run_simulated(config: RunConfig, work: Path) -> dict:
    started = time.time()
    result = run_simulation(config, work / "sim" / "flower", progress=lambda line: None)
    rounds = _round_times(Path(config.run_dir), started)
    return {"total_s": result.seconds, "round_s": rounds, "train_s": _site_seconds(Path(config.run_dir))}


def run_deployed(config: RunConfig, work: Path) -> dict:
    from medgen.server.deploy_cli import submit_and_wait

    root = work / "deploy"
    pki.create_ca(root / "pki" / "ca", "bench CA")
    pki.create_server_cert(root / "pki" / "ca", root / "pki" / "server")
    certs = ServerCerts.from_dir(root / "pki" / "server", root / "pki" / "ca" / "ca.crt")
    state, port = ServerState(root / "server-state"), free_port()
    state.root.mkdir(parents=True)
    state.write_connection(control_address("127.0.0.1", port), certs.ca_cert)
    processes: list[OwnedProcess] = []
    timings: dict[str, float] = {}
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
            node_config = root / "nodes" / f"{site}.toml"
            node_config.parent.mkdir(parents=True, exist_ok=True)
            node_config.write_text(node_config_toml({
                "site": site, "data-dir": f"{config.data_root}/sites/{site}",
                "state-dir": f"{config.state_root}/{site}", "public-dir": f"{config.data_root}/public"}))
            launch = NodeLaunch(f"127.0.0.1:{port}", certs.ca_cert, key.private_key, node_config, free_port())
            processes.append(OwnedProcess(supernode_command(launch), root / f"node-{site}.log").start())
        if client.wait_online(len(SITES), 180) < len(SITES):
            raise RuntimeError(f"the SuperNodes did not come online; see {root}")
        timings["supernodes_online_s"] = time.perf_counter() - start
        app_dir = write_app_dir(config, state.apps / "run")
        started = time.time()
        result = submit_and_wait(client, app_dir, config, timeout=1800, progress=lambda line: None)
        rounds = _round_times(Path(config.run_dir), started)
        return {"total_s": result.seconds, "round_s": rounds, "train_s": _site_seconds(Path(config.run_dir)),
                **timings}
    finally:
        for process in reversed(processes):
            process.stop()


def clientapp_import_s(repeats: int = 3) -> list[float]:
    """A fresh interpreter importing what every deployment ClientApp process imports."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CLIENTAPP_IMPORTS], check=True, env=flower_env())
        out.append(time.perf_counter() - start)
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

    Sites run in parallel, so a round costs about one site's imports + data load + training
    (the slowest site's training), plus the aggregation; the rest is the engine itself:
    process spawning, the SuperNode/SuperExec/ServerApp polling loops and the sites
    competing for the same cores (the imports were timed alone).
    """
    round_s = _median(deployed["round_s"][1:])
    sites = len(SITES)
    per_round = len(deployed["train_s"]) // max(1, len(deployed["round_s"]))
    train = [max(deployed["train_s"][i:i + per_round]) for i in range(0, len(deployed["train_s"]), per_round)]
    parts = {"clientapp_imports_s": _median(components["clientapp_imports_s"]),
             "data_load_s": _median(components["data_load_s"]),
             "training_slowest_site_s": _median(train[1:]) if len(train) > 1 else None,
             "aggregation_s": _median(components["aggregation_s"])}
    known = sum(v for v in parts.values() if v is not None)
    sim_train = _median(simulated["train_s"])
    return {"deployment_round_s": round_s, **parts,
            "engine_and_contention_s": round_s - known if round_s is not None else None,
            "simulation_round_s": _median(simulated["round_s"][1:]),
            "simulation_training_per_site_s": sim_train, "sites_in_parallel": sites,
            "training_cold_process_vs_warm_actor": (parts["training_slowest_site_s"] / sim_train)
            if parts["training_slowest_site_s"] and sim_train else None}


def main() -> None:
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medgen-bench-deploy-") as tmp:
        work = Path(tmp)
        data = work / "data"
        build_federation(SimConfig(seed=0, sites=",".join(SITES), subjects_per_site=6, public_size=6,
                                   heldout_fit=4, heldout_test=4, image_size=32), data)
        simulated = run_simulated(_config(data, work, "sim"), work)
        deployed = run_deployed(_config(data, work, "deploy"), work)
        components = {"clientapp_imports_s": clientapp_import_s(),
                      "data_load_s": data_load_s(_config(data, work, "deploy")),
                      "aggregation_s": aggregation_s(_config(data, work, "deploy"))}
    sim_round, dep_round = _median(simulated["round_s"][1:]), _median(deployed["round_s"][1:])
    write_result("deployment_overhead", {
        "rounds": ROUNDS, "sites": len(SITES), "image_size": 32, "local_steps": 2,
        "simulation": simulated, "deployment": deployed,
        "components_median_s": {k: _median(v) for k, v in components.items()},
        "components_runs_s": components,
        "steady_round_median_s": {"simulation": sim_round, "deployment": dep_round,
                                  "overhead": (dep_round - sim_round) if sim_round and dep_round else None},
        "first_round_s": {"simulation": simulated["round_s"][0], "deployment": deployed["round_s"][0]},
        "where_the_time_goes": where_the_time_goes(simulated, deployed, components),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "note": "steady rounds = rounds 2..N (round 1 includes app start-up and plan calibration). "
                "Deployment runs one fresh flwr-clientapp process per message: its round pays "
                "clientapp_imports_s + data_load_s at every site (in parallel) on top of training; "
                "simulation keeps Ray actors (and their imports) alive across rounds. 2 shared CPU "
                "cores: read the load averages with the times.",
    })


if __name__ == "__main__":
    main()
