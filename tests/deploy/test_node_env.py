"""medgen-client's SuperNode environment shortens SuperExec's task poll (Flower's default
1 s, flwr/supercore/superexec/run_superexec.py) and leaves an operator's own value alone
(mutation: dropping the setdefault fails the first test; assigning instead of setdefault
fails the second)."""

from medgen.deploy.launch import NODE_TASK_POLL_S, node_env

KEY = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def test_node_env_sets_the_task_poll(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    assert node_env()[KEY] == NODE_TASK_POLL_S and 0.01 <= float(NODE_TASK_POLL_S) < 1.0


def test_an_operators_poll_interval_wins(monkeypatch):
    monkeypatch.setenv(KEY, "2.5")
    assert node_env()[KEY] == "2.5"
