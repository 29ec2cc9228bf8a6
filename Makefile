# Two commands do all the set-up on a fresh machine (README):
#   make demo   builds .venv, then runs a 4-site federated DP simulation on the embedded default
#   make test   builds .venv, then runs the whole test suite (what CI runs: .ci/run)
# torch==2.13.0 is installed FIRST, on its own: with torch already present, the resolver
# never pulls the multi-GB CUDA wheels an unpinned torch brings in.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medgen-installed
RUN    ?= runs/demo

.PHONY: demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The embedded default federation and recipe, evaluated on enough held-out patients for the
# headline metric to give a verdict (128 per half: docs/evaluation.md, "How many images").
demo: $(STAMP)
	$(BIN)/medgen-server simulate --out $(RUN) --heldout-size 256 --set eval-samples=128 --set eval-every=5

# Two pytest processes. tests/deploy/test_pki.py runs an in-process gRPC TLS server: in the
# same process as the tests after it, the pytest process was later cut off (exit 1, no summary;
# reproduced with test_pki + tests/evaluation, each green alone), so it runs on its own (2 s).
# Root cause still open (see the issue notes). Everything else runs in 3 pytest-xdist workers,
# whole files per worker (module fixtures such as a small federation or a coordinator run stay
# in one process); 3 workers on 2 cores keep both cores busy while a Flower test's processes
# start one after the other (the worker count was not re-measured). Every server a test starts binds a free
# port on 127.0.0.1.
# Order: tests/conftest.py puts the longest files first (the deployment end-to-end test, ~10
# min of one worker) and --no-loadscope-reorder keeps that order (xdist's default reorders
# files by their number of tests, which queued the 3-test end-to-end file near the end).
# Cost of a Flower simulation test (a 2-site, 2-round tiny run, simulate-actors=1 as in
# tests/conftest.py): 69.5 s of CPU for its whole process tree (58.6 user + 10.9 sys, counted
# by a child subreaper; /usr/bin/time on the same command reports 16.3 s: Ray's processes are
# reparented and never reaped by it, nor by make, so `time make test`'s 21 min of user time
# undercounts the suite). Its wall time (90 s
# on a lightly loaded host) is processes starting, one after the other: medgen-server 6 s,
# SuperLink + `flwr run` 5 s, SuperExec picking the run up 4 s, flwr-simulation's imports 10 s,
# Ray 12 s, the ServerApp's set-up and round-0 evaluation 17 s while the Ray actor imports, then
# round 1 (the actor's imports) 23 s. Polling adds at most ~5 s (SuperExec 1 s, the harness's
# 1 s loop, `flwr log` <= 2 s; Flower's grid polls every 0.1 s): the suite is CPU-bound on 2
# cores, so the lever is fewer process starts, not shorter polls or more workers. The
# harness asks `flwr ls` once, when the SuperLink ends the log stream (not every 30 s).
# tests/deploy/test_e2e.py runs its 9 set-up commands (pki, register-node) through
# medgen.server.cli.main in the test process: ~6.7 s of CPU each as a console script.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy/test_pki.py
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=20 --ignore=tests/deploy/test_pki.py

bench: $(STAMP)
	$(BIN)/python -m bench.run_all  # --list, --only NAME ...

clean-demo:
	rm -rf $(RUN)
