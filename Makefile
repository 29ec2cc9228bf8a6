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
# in one process): much of a Flower test's wall time is processes starting and waiting on each
# other, so 3 workers on 2 cores overlap that waiting. Every server a test starts binds a free
# port on 127.0.0.1.
# Order: tests/conftest.py puts the longest files first (the deployment end-to-end test, ~10
# min of one worker) and --no-loadscope-reorder keeps that order (xdist's default reorders
# files by their number of tests, which queued the 3-test end-to-end file near the end).
# Cost of a Flower simulation test (a 2-site, 2-round tiny run; CPU of its whole process tree):
# ~75 s, of which each Ray actor ~18 s (imports), the ServerApp ~13 s, Ray's own processes
# ~9 s, SuperLink + SuperExec ~8 s, `flwr run`/`flwr log` ~4 s. Tests therefore run
# simulate-actors=1 (tests/conftest.py): ~58 s. The harness no longer polls `flwr ls` every
# 30 s (~2 s of CPU each: it now asks once, when the SuperLink ends the log stream).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy/test_pki.py
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=20 --ignore=tests/deploy/test_pki.py

bench: $(STAMP)
	$(BIN)/python -m bench.run_all  # --list, --only NAME ...

clean-demo:
	rm -rf $(RUN)
