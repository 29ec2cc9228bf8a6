"""bench/flower_timeline.py: the deployed round's split from Flower's log timestamps, and the
engine's CPU across processes.

- A synthetic SuperLink log + two SuperNode logs (the lines Flower 1.42 writes with
  FLWR_LOG_LEVEL=DEBUG, colour codes and untimed lines included) give back exactly the
  segments written into them, the slowest site's per round, and the ServerApp's wait from
  the last reply sent to its next pull (mutation: anchoring a segment on the wrong event, or
  taking the fastest site, changes a number and fails test 1).
- ``ProcessCPU`` counts a marked child's CPU and not an unmarked one's (mutation: dropping
  the environment check, or the per-process sum, fails test 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bench.flower_timeline import ProcessCPU, round_breakdown, summary

T0 = datetime(2026, 12, 3, 12, 0, 0)


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def flower(seconds: float, text: str, level: str = "DEBUG") -> str:
    return f"\x1b[94m{level} {stamp(seconds)}\x1b[0m:     {text}"


def node_log(path: Path, start: float, site: str, slow: float) -> None:
    """One train message at ``start``; ``slow`` stretches the trainer's round."""
    lines = [flower(start - 2.0, "Runtime.AcquireTask"), "INFO:     127.0.0.1:1 - \"POST /v1/x\" 200 OK",
             flower(start, "Receiving: train message (ID: abc)", "INFO"),
             flower(start + 0.2, "Received successfully", "INFO"),
             flower(start + 2.7, "Start `flwr-clientapp` process", "INFO"),
             flower(start + 3.0, "[flwr-clientapp] Start `ClientApp` Loading."),
             f"{stamp(start + 3.5)} trainer INFO site {site}: train request received (round 2)",
             flower(start + 5.5 + slow, "Runtime.PushMessages"),
             flower(start + 5.9 + slow, "Sending: train message (ID: def)", "INFO"),
             flower(start + 6.0 + slow, "Sent successfully", "INFO")]
    path.write_text("\n".join(lines) + "\n")


def test_segments_come_back_from_the_logs(tmp_path):
    link = tmp_path / "superlink.log"
    link.write_text("\n".join([flower(10.0, "Runtime.PushMessages"), flower(10.1, "Runtime.PullMessages"),
                               flower(13.1, "Runtime.PullMessages"), flower(16.1, "Runtime.PullMessages"),
                               flower(19.1, "Runtime.PullMessages")]) + "\n")
    node_log(tmp_path / "node-A.log", 11.0, "A", slow=0.0)
    node_log(tmp_path / "node-B.log", 12.0, "B", slow=1.0)
    started = (T0 + timedelta(seconds=1.0)).timestamp()
    ends = [(T0 + timedelta(seconds=9.9)).timestamp(), (T0 + timedelta(seconds=19.4)).timestamp()]
    rows = round_breakdown(link, {"A": tmp_path / "node-A.log", "B": tmp_path / "node-B.log"}, ends, started)
    assert rows[0]["sites"] == {}  # no message in round 1's window
    row = rows[1]
    assert abs(row["round_s"] - 9.5) < 1e-6 and abs(row["before_push_s"] - 0.1) < 1e-3
    a, b = row["sites"]["A"], row["sites"]["B"]
    assert a["node_pull_wait_s"] == 1.0 and b["node_pull_wait_s"] == 2.0
    assert a["download_s"] == 0.2 and a["superexec_poll_spawn_flower_imports_s"] == 2.5
    assert a["clientapp_inputs_fab_s"] == 0.3 and a["clientapp_load_forward_s"] == 0.5
    assert a["trainer_round_s"] == 2.0 and b["trainer_round_s"] == 3.0 and a["clientapp_run_s"] == 2.5
    assert a["node_reply_wait_s"] == 0.4 and a["upload_s"] == 0.1
    # the last reply (B) was sent at 19.0; the ServerApp pulled at 19.1
    assert row["server_pull_wait_s"] == 0.1 and row["after_pull_s"] == 0.3
    assert row["last_reply_sent_after_push_s"] == 9.0
    med = summary(rows[1:])
    assert med["node_pull_wait_s"] == 2.0 and med["trainer_round_s"] == 3.0  # the slowest site


@pytest.mark.slow  # two Python processes burning CPU: slow on a loaded machine
def test_process_cpu_counts_marked_processes_only():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.6)"
    with ProcessCPU("MEDGEN_TEST_MARK_7f3a", interval=0.1) as cpu:
        env = {**os.environ, "MEDGEN_TEST_MARK_7f3a": "1"}
        subprocess.run([sys.executable, "-c", burn], env=env, check=True)
        marked = cpu.total()
        subprocess.run([sys.executable, "-c", burn], check=True)
    assert marked >= 0.5
    assert cpu.total() - marked < 0.2
