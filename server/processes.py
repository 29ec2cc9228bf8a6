"""Linux process table helpers: who is alive, in which session, started when, marked how.

Everything reads /proc directly (no psutil). A process is identified by its pid AND its
start time (field 22 of /proc/PID/stat, clock ticks since boot): a pid that was recycled
for another program never matches, so nothing here ever signals a stranger.

Markers: the coordinator puts ``MEDGEN_RUN_DIR`` and ``MEDGEN_COORDINATOR`` in the
environment of every process it starts; children inherit them. ``/proc/PID/environ``
shows the environment a program was started with, except where a program overwrote that
memory (Ray's agents rename themselves with setproctitle and zero it), which is why the
supervisor also follows sessions and recorded pids (server/supervisor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
RUN_DIR_VAR = "MEDGEN_RUN_DIR"
COORDINATOR_VAR = "MEDGEN_COORDINATOR"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    start: str      # start time in clock ticks after boot: (pid, start) names one process
    state: str      # R, S, D, Z, ...

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_proc(pid: int) -> Proc | None:
    """The process ``pid``, or None if it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), start=fields[19],
                    state=fields[0])
    except (OSError, IndexError, ValueError):
        return None


def scan() -> dict[int, Proc]:
    """Every process visible in /proc."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
            table[proc.pid] = proc
    return table


def children_map(table: dict[int, Proc] | None = None) -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in (table or scan()).values():
        tree.setdefault(proc.ppid, []).append(proc.pid)
    return tree


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    """Every living descendant of ``root`` (children, their children, ...)."""
    table = table if table is not None else scan()
    tree, stack, out = children_map(table), [root], []
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(table[child])
            stack.append(child)
    return out


def start_time(pid: int) -> str | None:
    proc = read_proc(pid)
    return proc.start if proc is not None else None


def alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, if ``start`` is given, is that same process."""
    proc = read_proc(pid)
    return proc is not None and not proc.zombie and (start is None or proc.start == start)


def environment(pid: int) -> set[str]:
    """The ``KEY=VALUE`` entries a process was started with (empty if unreadable)."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return set()
    return {item.decode("utf-8", "replace") for item in raw.split(b"\0") if item}


def markers(run_dir: Path, coordinator_id: str | None = None) -> dict[str, str]:
    """The environment entries that mark a process as started for ``run_dir``."""
    marks = {RUN_DIR_VAR: str(Path(run_dir).resolve())}
    if coordinator_id is not None:
        marks[COORDINATOR_VAR] = coordinator_id
    return marks


def is_marked(pid: int, marks: dict[str, str]) -> bool:
    env = environment(pid)
    return bool(env) and all(f"{key}={value}" in env for key, value in marks.items())


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""
