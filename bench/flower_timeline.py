"""Where a deployed round's time goes, read from Flower's own timestamps.

``FLWR_LOG_LEVEL=DEBUG`` makes every Flower process (SuperLink, SuperNode, SuperExec,
flwr-clientapp, flwr-serverapp) print a millisecond timestamp on each log line
(flwr/supercore/logger.py); the warm trainer logs its own (client/worker.py). All processes
share one clock, so consecutive events of one message give the segments of its path:

    SuperLink  Runtime.PushMessages          the ServerApp sends round r
    SuperNode  Receiving: train message      its idle pull loop got it (sleeps 3 s when empty)
               Received successfully         message objects downloaded
               Start `flwr-clientapp` process   SuperExec's poll (1 s default) + process
                                             start + Flower's runtime imports
               [flwr-clientapp] Start `ClientApp` Loading.   inputs pulled, FAB installed
               trainer ... request received  (warm) medgen's ClientApp imported, forwarded
               Runtime.PushMessages          the ClientApp's reply reaches the SuperNode
               Sending: train message        the SuperNode's reply loop (polls every 0.5 s)
               Sent successfully             reply uploaded to the SuperLink
    SuperLink  Runtime.PullMessages          the ServerApp's reply poll (sleeps 3 s)
    metrics.jsonl  train record              aggregated, checkpointed, recorded

``ProcessCPU`` sums the CPU time (utime + stime, /proc) of every process carrying this
bench's marker in its environment (Flower's processes inherit it, also those re-parented to
init), sampled every ``interval`` s: a lower bound (a process's last < interval s is missed).
The sampler itself runs in the bench's process, which it does not count.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLOWER_STAMP = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s+(.*)$")
TRAINER_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) trainer \w+ (.*)$")

NODE_EVENTS = (  # (name, the log text that marks it), in path order
    ("received", "Receiving: train message"),
    ("downloaded", "Received successfully"),
    ("clientapp_started", "Start `flwr-clientapp` process"),
    ("clientapp_loading", "[flwr-clientapp] Start `ClientApp` Loading."),
    ("trainer_got_request", "train request received"),
    ("reply_at_node", "Runtime.PushMessages"),
    ("sending", "Sending: train message"),
    ("sent", "Sent successfully"),
)
SEGMENTS = (  # (segment, from event, to event)
    ("node_pull_wait_s", "pushed", "received"),
    ("download_s", "received", "downloaded"),
    ("superexec_poll_spawn_flower_imports_s", "downloaded", "clientapp_started"),
    ("clientapp_inputs_fab_s", "clientapp_started", "clientapp_loading"),
    ("clientapp_load_forward_s", "clientapp_loading", "trainer_got_request"),
    ("trainer_round_s", "trainer_got_request", "reply_at_node"),
    ("clientapp_run_s", "clientapp_loading", "reply_at_node"),
    ("node_reply_wait_s", "reply_at_node", "sending"),
    ("upload_s", "sending", "sent"),
)


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def events(log_path: Path) -> list[tuple[float, str]]:
    """(unix time, message) of every timestamped line of a Flower/trainer log."""
    out = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        line = ANSI.sub("", line).strip()
        if m := FLOWER_STAMP.match(line) or TRAINER_STAMP.match(line):
            out.append((_stamp(m.group(1)), m.group(2)))
    return out


def node_rounds(log_path: Path) -> list[dict[str, float]]:
    """One dict per train message the SuperNode received: each NODE_EVENTS name -> time
    (the first occurrence after 'received' and before the next message)."""
    rounds: list[dict[str, float]] = []
    for t, msg in events(log_path):
        if NODE_EVENTS[0][1] in msg:
            rounds.append({"received": t})
            continue
        if rounds:
            for name, text in NODE_EVENTS[1:]:
                if text in msg and name not in rounds[-1]:
                    rounds[-1][name] = t
                    break
    return rounds


def link_times(log_path: Path, text: str) -> list[float]:
    return [t for t, msg in events(log_path) if msg.startswith(text)]


def round_breakdown(superlink_log: Path, node_logs: dict[str, Path], round_ends: list[float],
                    started: float) -> list[dict]:
    """Per round: each site's segments, the ServerApp's reply-poll wait (first pull after the
    last site's reply was sent) and the rest (aggregate + checkpoint + record)."""
    pushes = link_times(superlink_log, "Runtime.PushMessages")
    pulls = link_times(superlink_log, "Runtime.PullMessages")
    per_site = {site: node_rounds(path) for site, path in node_logs.items()}
    out = []
    for r, end in enumerate(round_ends):
        begin = round_ends[r - 1] if r else started
        push = next((t for t in pushes if begin <= t <= end), None)
        row: dict = {"round": r + 1, "round_s": end - begin,
                     "before_push_s": (push - begin) if push is not None else None, "sites": {}}
        sent = []
        for site, rounds in per_site.items():
            ev = next((e for e in rounds if push is not None and push <= e["received"] <= end), None)
            if ev is None:
                continue
            ev = {"pushed": push, **ev}
            row["sites"][site] = {seg: round(ev[b] - ev[a], 3) for seg, a, b in SEGMENTS if a in ev and b in ev}
            if "sent" in ev:
                sent.append(ev["sent"])
        if sent and len(sent) == len(node_logs):
            pull = next((t for t in pulls if t >= max(sent)), None)
            row["server_pull_wait_s"] = round(pull - max(sent), 3) if pull is not None else None
            row["after_pull_s"] = round(end - pull, 3) if pull is not None else None
            row["last_reply_sent_after_push_s"] = round(max(sent) - push, 3)
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    """Medians over the given rounds: each site segment (the slowest site's per round) and
    the server-side waits."""
    keys = [seg for seg, _, _ in SEGMENTS]
    med: dict = {}
    for key in keys:
        vals = [max(s[key] for s in r["sites"].values() if key in s) for r in rows
                if any(key in s for s in r["sites"].values())]
        med[key] = round(statistics.median(vals), 3) if vals else None
    for key in ("round_s", "before_push_s", "server_pull_wait_s", "after_pull_s", "last_reply_sent_after_push_s"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        med[key] = round(statistics.median(vals), 3) if vals else None
    return med


class ProcessCPU:
    """CPU seconds of every live process whose environment holds ``marker`` (sampled)."""

    def __init__(self, marker: str, interval: float = 1.0):
        self.marker = marker.encode()
        self.interval = interval
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start) -> last cpu seconds
        self.other: set[int] = set()  # pids seen without the marker
        self.series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def total(self) -> float:
        return sum(self.seen.values())

    def at(self, when: float) -> float | None:
        """Total CPU seconds sampled at (just before) unix time ``when``."""
        before = [cpu for t, cpu in self.series if t <= when]
        return before[-1] if before else None

    def _sample(self) -> None:
        me = os.getpid()  # the bench itself (and this sampler) is not the engine
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.other or int(entry.name) == me:
                continue  # an unmarked pid stays unmarked (a reused pid is missed: rare)
            pid = int(entry.name)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                key = (pid, int(fields[19]))
                if key not in self.seen and self.marker not in Path(f"/proc/{pid}/environ").read_bytes():
                    self.other.add(pid)
                    continue
                self.seen[key] = (int(fields[11]) + int(fields[12])) / self._tick
            except (OSError, IndexError, ValueError):
                continue
        self.series.append((time.time(), self.total()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()
