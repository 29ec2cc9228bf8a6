"""Run a whole federation on this machine with Flower's REAL simulation engine.

``run_simulation`` owns every process it starts:
1. the simulated federation's data (medgen.sim) is built, or reused if already there;
2. the app directory is written: the FAB template (core/flowerapp) whose
   [tool.flwr.app.config] table is the run's full RunConfig (Flower only accepts run-config
   keys listed there, so the config travels in the bundle, no quoting on a command line);
3. ``flower-superlink --simulation --insecure --disable-runtime-dependency-installation``
   is started on a free 127.0.0.1 port in a new session, with its own FLWR_HOME inside the
   run directory and the app directory as cwd (Ray imports the app from there; FLOWER.md);
4. ``flwr run APP_DIR medgen --federation-config "num-supernodes=K client-resources-num-cpus=1"``
   submits the run (K = number of sites; FLOWER.md: the defaults would starve a run);
5. progress is printed from run-dir/metrics.jsonl while the run goes; the end is the DONE
   marker the ServerApp writes (or the run reported finished without one: a failure);
6. the results are verified (``flwr run`` exits 0 even if every ClientApp failed);
7. in ``finally``: the SuperLink's process group and every descendant seen are stopped
   by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medgen.config import RunConfig
from medgen.server.checkpoint import load_checkpoint
from medgen.server.run_log import RunDir, read_metrics, show_new_records

CONNECTION = "medgen"
STATUS_EVERY = 30.0  # seconds between `flwr ls` checks (a Python start each: not free on 2 cores)
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "core" / "flowerapp"


class SimulationError(RuntimeError):
    """The simulation did not produce a usable result; the message says what and where."""


def _template_dir() -> Path:
    import medgen

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
    import medgen

    # the bundle asks for exactly the medgen that wrote it (hospitals check it too)
    head = re.sub(r'"medgen==[^"]*"', f'"medgen=={medgen.__version__}"', head)
    body = config.to_toml().replace("\n[options]\n", "\n[tool.flwr.app.config.options]\n")
    (dest / "pyproject.toml").write_text(f"{head}[tool.flwr.app.config]\n{body}")
    return dest


# -- the federation's data ------------------------------------------------------------
def prepare_federation(config: RunConfig, data_root: Path, *, num_sites: int | None,
                       subjects_per_site: int, reuse_any: bool = False, **sim_options) -> RunConfig:
    """Build (or reuse) the simulated federation; returns the config with its sites and root.

    ``reuse_any``: a data root that already holds a federation is used as it is, whatever
    settings built it (its manifest names the sites), except that ``dicom_sites``, when
    given, must be the ones it was built with; otherwise medgen.sim rebuilds only if the
    settings changed and refuses to overwrite a different build.
    """
    from medgen.sim.config import SimConfig, SimConfigError
    from medgen.sim.federation import Manifest, build_federation

    if reuse_any and (Path(data_root) / "manifest.json").is_file():
        manifest = Manifest.load(Path(data_root))
        wanted = SimConfig(sites=",".join(manifest.site_names),
                           dicom_sites=sim_options.get("dicom_sites", ())).dicom_sites
        if wanted and wanted != manifest.config.dicom_sites:
            built = ",".join(manifest.config.dicom_sites) or "none"
            raise SimConfigError(f"{data_root} holds a federation whose DICOM sites are {built}, "
                                 f"not {','.join(wanted)}; build it with these DICOM sites into "
                                 "another --data-root (or leave --dicom-sites out to use it as it is)")
        return config.replace(sites=",".join(manifest.site_names),
                              data_root=str(Path(data_root).resolve()))
    sites = str(num_sites) if num_sites is not None else config.sites
    sim_config = SimConfig(seed=config.seed, sites=sites, subjects_per_site=subjects_per_site,
                           image_size=config.image_size, **sim_options)
    manifest = build_federation(sim_config, data_root)
    return config.replace(sites=",".join(manifest.site_names), data_root=str(Path(data_root).resolve()))


# -- processes ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class SuperLink:
    """A SuperLink in simulation mode that this process owns, with everything it spawns."""

    def __init__(self, app_dir: Path, flwr_home: Path, log_path: Path, port: int | None = None):
        self.app_dir, self.flwr_home, self.log_path = app_dir, flwr_home, log_path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, str] = {}  # pid -> start time: never kill a recycled pid

    @property
    def env(self) -> dict[str, str]:
        # Flower spawns flower-superexec / flwr-simulation by name: our environment's first
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1"}

    def start(self, ready_timeout: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        command = [_tool("flower-superlink"), "--simulation", "--insecure",
                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(command, cwd=self.app_dir, env=self.env, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise SimulationError(f"the SuperLink did not open port {self.port} within {ready_timeout:.0f} s; "
                              f"see {self.log_path}")

    def check_alive(self) -> None:
        self.remember_descendants()
        if self.proc is not None and self.proc.poll() is not None:
            raise SimulationError(f"the SuperLink exited with code {self.proc.returncode}; "
                                  f"see {self.log_path}")

    def remember_descendants(self) -> None:
        if self.proc is None:
            return
        tree, stack = _children(), [self.proc.pid]
        while stack:
            for child in tree.get(stack.pop(), []):
                if child not in self.seen and (start := _start_time(child)) is not None:
                    self.seen[child] = start
                stack.append(child)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group and every descendant seen, then SIGKILL what is left."""
        if self.proc is None:
            return
        self.remember_descendants()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid, start in list(self.seen.items()):
                if _start_time(pid) == start:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.proc.poll() is None or self._alive_seen()):
                time.sleep(0.2)
            if self.proc.poll() is not None and not self._alive_seen():
                break
        self.proc.wait(timeout=5)

    def _alive_seen(self) -> bool:
        return any(_start_time(pid) == start and not _zombie(pid) for pid, start in self.seen.items())

    def stream_log(self, run_id: str, path: Path) -> subprocess.Popen:
        """`flwr log --stream` into ``path``: the ServerApp's and ClientApps' log lines."""
        with open(path, "ab") as out:
            return subprocess.Popen([_tool("flwr"), "log", run_id, CONNECTION, "--stream"],
                                    cwd=self.app_dir, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("flwr"), *args], cwd=self.app_dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)


def _zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tool(name: str) -> str:
    # the console scripts of the environment medgen runs in (not whatever is on PATH)
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


# -- one simulated run ------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    final_round: int
    report: Path | None
    seconds: float


def run_simulation(config: RunConfig, work_dir: Path, *, timeout: float = 3600.0,
                   progress: Callable[[str], None] = print, port: int | None = None) -> SimulationResult:
    """Run ``config`` (data-root, state-root and run-dir already set, absolute) to the end."""
    run_dir = RunDir(Path(config.run_dir))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.clear_done()
    app_dir = write_app_dir(config, work_dir / "app")
    link = SuperLink(app_dir, work_dir / "home", work_dir / "superlink.log", port)
    started, shown = time.monotonic(), len(read_metrics(run_dir.metrics))
    log_stream: subprocess.Popen | None = None
    try:
        link.start()
        federation = (f"num-supernodes={len(config.site_names)} client-resources-num-cpus=1")
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
                 f"{config.num_rounds} rounds; log of the apps: {work_dir / 'run.log'}")
        last_status_check = 0.0
        finished_at = None
        while (done := run_dir.read_done()) is None:
            link.check_alive()
            shown = show_new_records(run_dir.metrics, shown, config.num_rounds, progress)
            now = time.monotonic()
            if now - started > timeout:
                raise SimulationError(f"the run did not finish within {timeout:.0f} s; see {work_dir / 'run.log'}")
            if finished_at is None and run_id and now - last_status_check > STATUS_EVERY:
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
            time.sleep(2.0)  # let the last lines arrive
            log_stream.terminate()
            try:
                log_stream.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log_stream.kill()
        link.stop()
    return verify_results(run_dir, done, config, time.monotonic() - started)


def verify_results(run_dir: RunDir, done: dict, config: RunConfig, seconds: float) -> SimulationResult:
    if done.get("status") != "ok":
        raise SimulationError(f"the ServerApp failed: {done.get('error', 'unknown error')} "
                              f"(run dir {run_dir.path})")
    checkpoint = load_checkpoint(run_dir.path)
    if checkpoint is None:
        raise SimulationError(f"no checkpoint was written in {run_dir.path}: no round completed")
    trained = [r for r in read_metrics(run_dir.metrics) if r.get("kind") == "train" and r.get("per_site")]
    if not trained:
        raise SimulationError(f"no site's update was accepted in any round (see the 'excluded' "
                              f"entries in {run_dir.metrics}): every ClientApp failed or was refused")
    report = run_dir.path / "report.html"
    return SimulationResult(run_dir.path, checkpoint.server_round, report if report.exists() else None,
                            seconds)


def add_node_ledgers(run_dir: RunDir, config: RunConfig) -> None:
    """Simulation only: add every node's own ledger summary to privacy.json, re-render the report."""
    from medgen.atomic import atomic_write_json
    from medgen.privacy.ledger import PrivacyLedger

    summaries = {}
    for site in config.site_names:
        path = Path(config.state_root) / site / "privacy_ledger.json"
        if path.exists():
            summaries[site] = PrivacyLedger.open(path, site=site).summary()
    privacy = json.loads(run_dir.privacy.read_text()) if run_dir.privacy.exists() else {}
    privacy["node_ledgers"] = summaries
    atomic_write_json(run_dir.privacy, privacy)
    from medgen.evaluation.report import write_report
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
