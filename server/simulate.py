"""Run a whole federation on this machine with Flower's REAL simulation engine.

``run_simulation`` is a coordinator (server/coordinator.py) that owns its run directory and
every process it starts:
0. it claims the run directory: the lock refuses a second coordinator, whatever a crashed
   predecessor left running is stopped, and a supervisor process stands by to stop
   everything this one starts if it dies, SIGKILL included (server/supervisor.py);
1. the simulated federation's data (medgen.sim) is built, or reused if already there: the
   brain default or, with ``federation="head-ct"``, the head CT/MR federation; the run's
   ``label-names`` come from the federation's root dataset.toml (its label schema);
2. the app directory is written: the FAB template (core/flowerapp) whose
   [tool.flwr.app.config] table is the run's full RunConfig, coordinator-id included
   (Flower only accepts run-config keys listed there, so the config travels in the bundle,
   no quoting on a command line);
3. ``flower-superlink --simulation --insecure --disable-runtime-dependency-installation``
   is started on a free 127.0.0.1 port (server/superlink.py), with its own FLWR_HOME inside
   the run directory, the app directory as cwd (Ray imports the app from there; FLOWER.md)
   and the coordinator's marker environment, which every descendant inherits;
4. ``flwr run APP_DIR medgen --federation-config "num-supernodes=K client-resources-num-cpus=1"``
   submits the run (K = number of sites; FLOWER.md: the defaults would starve a run);
5. progress is printed from run-dir/metrics.jsonl while the run goes, and every process
   seen is recorded for the supervisor; the end is the DONE marker the ServerApp writes
   carrying THIS coordinator's id (a DONE from another coordinator is ignored), or the run
   reported finished without one: a failure (``flwr ls`` is asked when the SuperLink ends
   the ``flwr log --stream`` it ends at the run's end, not on a timer);
6. the results are verified (``flwr run`` exits 0 even if every ClientApp failed), and a
   run whose last rounds trained no site ends in ``NothingTrained`` (server/outcome.py);
7. in ``finally``: the SuperLink's process group and every descendant seen are stopped
   by PID; then the supervisor sweeps and the lock is released.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import medgen
from medgen.atomic import atomic_write_json
from medgen.config import RunConfig
from medgen.data.manifest import load_manifest
from medgen.evaluation.report import write_report
from medgen.privacy.ledger import PrivacyLedger
from medgen.server.coordinator import Coordinator
from medgen.server.outcome import RunOutcome, run_outcome
from medgen.server.processes import start_time
from medgen.server.run_log import RunDir, read_metrics, show_new_records
from medgen.server.superlink import CONNECTION, SimulationError, SuperLink, _tool, free_port  # noqa: F401
from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.federation import Manifest, build_federation
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import HeadManifest, build_head_federation

STATUS_EVERY = 30.0  # seconds between `flwr ls` checks once the log stream has ended
# ... and while it runs: the SuperLink ends `flwr log --stream` when the run finishes, so the
# stream's exit is the signal to ask; each `flwr ls` is a Python start (about 2 s of CPU, and
# every 30 s that was a tenth of a tiny run's CPU on 2 cores). This slow check stays for a
# stream that hangs.
STATUS_WHILE_STREAMING = 300.0
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "core" / "flowerapp"


class NothingTrained(SimulationError):
    """The run ended, but its last planned rounds trained no site (the checkpoint kept the
    last trained weights); ``result`` has the outcome, the message says why."""

    def __init__(self, result: "SimulationResult"):
        super().__init__(result.outcome.summary())
        self.result = result


def _template_dir() -> Path:
    # installed package data first (core/ is the medgen package), repository layout second
    for candidate in (Path(medgen.__file__).resolve().parent / "flowerapp", TEMPLATE_DIR):
        if (candidate / "pyproject.toml").exists():
            return candidate
    raise SimulationError("the Flower app template (medgen/flowerapp/pyproject.toml) is missing "
                          "from the installation; reinstall medgen")


def write_app_dir(config: RunConfig, dest: Path) -> Path:
    """Copy the FAB template to ``dest`` with ``config`` as its run-config table."""
    template = _template_dir()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template / "medgen_flower_shim.py", dest / "medgen_flower_shim.py")
    text = (template / "pyproject.toml").read_text()
    head = text.split("\n[tool.flwr.app.config]")[0] + "\n"  # line start: the header comment names the table too
    # the bundle asks for exactly the medgen that wrote it (hospitals check it too)
    head = re.sub(r'"medgen==[^"]*"', f'"medgen=={medgen.__version__}"', head)
    body = config.to_toml().replace("\n[options]\n", "\n[tool.flwr.app.config.options]\n")
    (dest / "pyproject.toml").write_text(f"{head}[tool.flwr.app.config]\n{body}")
    return dest


# -- the federation's data ------------------------------------------------------------
FEDERATIONS = ("brain", "head-ct")  # medgen-server simulate --federation


def prepare_federation(config: RunConfig, data_root: Path, *, num_sites: int | None,
                       subjects_per_site: int, reuse_any: bool = False, federation: str = "brain",
                       **sim_options) -> RunConfig:
    """Build (or reuse) the simulated federation; returns the config with its sites, root and
    label schema (``label-names`` from the federation's root dataset.toml).

    ``federation``: "brain" (the default) or "head-ct" (sim/head_federation.py: CT sites
    A-D in HU and the MR site M, 7 classes). ``reuse_any``: a data root that already holds
    a federation is used as it is, whatever settings built it (its manifest names the
    federation and the sites), except that ``dicom_sites``, when given, must be the ones it
    was built with; otherwise medgen.sim rebuilds only if the settings changed and refuses
    to overwrite a different build.
    """
    if federation not in FEDERATIONS:
        raise SimConfigError(f"federation must be one of {', '.join(FEDERATIONS)}, got {federation!r}")
    if reuse_any and (Path(data_root) / "manifest.json").is_file():
        built = Manifest.load(Path(data_root)).data.get("federation", "brain")
        if built == "head-ct":
            return _with_schema(config.replace(sites=",".join(HeadManifest.load(Path(data_root)).site_names),
                                               data_root=str(Path(data_root).resolve())))
        manifest = Manifest.load(Path(data_root))
        wanted = SimConfig(sites=",".join(manifest.site_names),
                           dicom_sites=sim_options.get("dicom_sites", ())).dicom_sites
        if wanted and wanted != manifest.config.dicom_sites:
            built = ",".join(manifest.config.dicom_sites) or "none"
            raise SimConfigError(f"{data_root} holds a federation whose DICOM sites are {built}, "
                                 f"not {','.join(wanted)}; build it with these DICOM sites into "
                                 "another --data-root (or leave --dicom-sites out to use it as it is)")
        return _with_schema(config.replace(sites=",".join(manifest.site_names),
                                           data_root=str(Path(data_root).resolve())))
    if federation == "head-ct":
        return _with_schema(_build_head(config, data_root, num_sites, subjects_per_site, **sim_options))
    sites = str(num_sites) if num_sites is not None else config.sites
    sim_config = SimConfig(seed=config.seed, sites=sites, subjects_per_site=subjects_per_site,
                           image_size=config.image_size, **sim_options)
    manifest = build_federation(sim_config, data_root)
    return _with_schema(config.replace(sites=",".join(manifest.site_names),
                                       data_root=str(Path(data_root).resolve())))


def _build_head(config: RunConfig, data_root: Path, num_sites: int | None, subjects_per_site: int,
                dicom_sites: str | tuple[str, ...] = "", **sim_options) -> RunConfig:
    """The head CT/MR federation: ``num_sites`` takes the first N of A, B, C, D, M; without
    it the run config's sites are used if they were set (not the brain default A-D, which
    would silently drop the MR site M) and are head sites, else all five."""
    if dicom_sites:
        raise SimConfigError("--dicom-sites is for the brain federation; the head-ct federation "
                             "writes NIfTI sites in HU (see docs/simulated-federation.md)")
    default = HeadSimConfig().site_names
    if num_sites is not None:
        if num_sites > len(default):
            raise SimConfigError(f"the head-ct federation has at most {len(default)} sites "
                                 f"({','.join(default)}), asked for {num_sites}")
        sites = ",".join(default[:num_sites])
    else:
        chosen = config.sites != RunConfig().sites and set(config.site_names) <= set(default)
        sites = config.sites if chosen else ",".join(default)
    head = HeadSimConfig(seed=config.seed, sites=sites, subjects_per_site=subjects_per_site,
                         image_size=config.image_size, **sim_options)
    manifest = build_head_federation(head, data_root)
    return config.replace(sites=",".join(manifest.site_names), data_root=str(Path(data_root).resolve()))


def _with_schema(config: RunConfig) -> RunConfig:
    """``label-names`` from the federation's root dataset.toml (the brain's default schema
    where there is none); an unlabelled federation keeps the config's."""
    labels = load_manifest(root=config.data_root).labels
    return config if labels is None else config.replace(label_names=",".join(labels.names))


# -- one simulated run ------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    final_round: int           # the checkpoint's round: the last round that trained
    report: Path | None
    seconds: float
    outcome: RunOutcome | None = None


def run_simulation(config: RunConfig, work_dir: Path, *, timeout: float = 3600.0,
                   progress: Callable[[str], None] = print, port: int | None = None,
                   coordinator: Coordinator | None = None) -> SimulationResult:
    """Run ``config`` (data-root, state-root and run-dir already set, absolute) to the end.

    ``coordinator``: the claim on run-dir (server/coordinator.py); None claims it here.
    """
    if coordinator is None:
        with Coordinator.claim(Path(config.run_dir), progress) as claimed:
            return run_simulation(config, work_dir, timeout=timeout, progress=progress, port=port,
                                  coordinator=claimed)
    config = config.replace(coordinator_id=coordinator.id)
    run_dir = RunDir(Path(config.run_dir))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.clear_done()
    app_dir = write_app_dir(config, work_dir / "app")
    link = SuperLink(app_dir, work_dir / "home", work_dir / "superlink.log", port, extra_env=coordinator.env)
    started, shown = time.monotonic(), len(read_metrics(run_dir.metrics))
    log_stream: subprocess.Popen | None = None

    def keep_watch() -> None:  # every process seen goes on the supervisor's list
        link.check_alive()
        watched = dict(link.seen)
        if log_stream is not None and (start := start_time(log_stream.pid)) is not None:
            watched[log_stream.pid] = start
        coordinator.record(watched)
        coordinator.check_supervisor()

    try:
        link.start()
        keep_watch()
        federation = (f"num-supernodes={len(config.site_names)} client-resources-num-cpus=1"
                      + (f" init-args-num-cpus={config.simulate_actors}" if config.simulate_actors else ""))
        submitted = link.flwr("run", str(app_dir), CONNECTION, "--federation-config", federation,
                              "--format", "json")
        if submitted.returncode != 0:
            raise SimulationError(f"flwr run failed ({submitted.returncode}): "
                                  f"{(submitted.stderr or submitted.stdout).strip()[-2000:]}")
        run_id = _run_id(submitted.stdout)
        if run_id is None:  # `flwr run --format json` exits 0 on some failures
            raise SimulationError(f"flwr run did not start a run: "
                                  f"{(submitted.stdout + submitted.stderr).strip()[-2000:]}")
        log_stream = link.stream_log(run_id, work_dir / "run.log")
        progress(f"submitted Flower run {run_id}: {len(config.site_names)} sites, "
                 f"{config.num_rounds} rounds; coordinator {coordinator.id}; log of the apps: "
                 f"{work_dir / 'run.log'}")
        last_status_check, stream_ended = time.monotonic(), False
        finished_at = None
        while (done := run_dir.read_done(coordinator.id)) is None:
            keep_watch()
            shown = show_new_records(run_dir.metrics, shown, config.num_rounds, progress)
            now = time.monotonic()
            if now - started > timeout:
                raise SimulationError(f"the run did not finish within {timeout:.0f} s; see {work_dir / 'run.log'}")
            if not stream_ended and log_stream.poll() is not None:
                stream_ended, last_status_check = True, 0.0  # the run finished (or the stream broke): ask now
            every = STATUS_EVERY if stream_ended else STATUS_WHILE_STREAMING
            if finished_at is None and run_id and now - last_status_check > every:
                last_status_check = now
                if _finished(link, run_id):
                    finished_at = now
            if finished_at is not None and now - finished_at > 15:
                raise SimulationError(f"Flower reports run {run_id} finished but the ServerApp wrote no "
                                      f"DONE marker in {run_dir.path}; see {link.log_path}")
            time.sleep(1.0)
        show_new_records(run_dir.metrics, shown, config.num_rounds, progress)
    finally:
        if log_stream is not None:
            try:  # let the last lines arrive: the stream ends by itself once the run has finished
                log_stream.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                log_stream.terminate()
                try:
                    log_stream.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log_stream.kill()
        link.stop()
    return verify_results(run_dir, done, config, time.monotonic() - started)


def verify_results(run_dir: RunDir, done: dict, config: RunConfig, seconds: float) -> SimulationResult:
    """The result of a run that wrote DONE; raises SimulationError if it failed and
    NothingTrained if its last planned rounds trained no site."""
    if done.get("status") != "ok":
        raise SimulationError(f"the ServerApp failed: {done.get('error', 'unknown error')} "
                              f"(run dir {run_dir.path})")
    records = read_metrics(run_dir.metrics)
    outcome = run_outcome(run_dir.path, records, config.num_rounds, config.site_names, config.min_sites)
    report = run_dir.path / "report.html"
    result = SimulationResult(run_dir.path, outcome.final_round or 0, report if report.exists() else None,
                              seconds, outcome)
    if not outcome.complete:
        raise NothingTrained(result)
    return result


def add_node_ledgers(run_dir: RunDir, config: RunConfig) -> None:
    """Simulation only: add every node's own ledger summary to privacy.json, re-render the report."""
    summaries = {}
    for site in config.site_names:
        path = Path(config.state_root) / site / "privacy_ledger.json"
        if path.exists():
            summaries[site] = PrivacyLedger.open(path, site=site).summary()
    privacy = json.loads(run_dir.privacy.read_text()) if run_dir.privacy.exists() else {}
    privacy["node_ledgers"] = summaries
    atomic_write_json(run_dir.privacy, privacy)
    write_report(run_dir.path)


def _run_id(stdout: str) -> str | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line).get("run-id")
        except (json.JSONDecodeError, AttributeError):
            continue
    try:
        return json.loads(stdout).get("run-id")
    except (json.JSONDecodeError, AttributeError):
        return None


def _finished(link: SuperLink, run_id: str) -> bool:
    try:
        listed = link.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60)
        runs = json.loads(listed.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
        return False
    return any(str(r.get("status", "")).startswith("finished") for r in runs)
