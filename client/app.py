"""The ClientApp: what Flower runs, in a fresh process, for every message a node receives.

Per message: resolve the node (client/node.py) -> the hospital's allow-list
(deploy/allowlist.py), before any data, ledger or work -> the round itself
(client/rounds.py: replay check, data, ONE privacy round, reply), run

- on the **warm path** (node-config ``trainer = "warm"``, set by ``medgen-client``): by the
  hospital's long-lived trainer (client/worker.py), to which this process forwards the
  round's content over a Unix socket only the node's user can open
  (client/worker_channel.py), returning its reply; or
- on the **cold path** (no ``trainer`` key: simulation, ``medgen-client --trainer cold``,
  tests): here, in this process.

Either way the same ``rounds.answer`` runs, and the mods below wrap it here: the message
audit (outbox_mod) records exactly what leaves the node, after client-level clipping and
SecAgg+ masking. Errors go back as a Flower Error whose reason is a fixed, path-free
sentence (full detail stays in the node's log).

This module is the per-message import path, so it imports only Flower and small medgen
modules; torch, MONAI, Opacus and the recipes are imported by client/rounds.py, only on
the cold path (the one lazy import, tests/test_layering.py). ``python -X importtime``
figures: docs/deployment.md, "The warm trainer".
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from medgen.client.codes import (BUDGET_EXCEEDED, EVALUATION_FAILED, SITE_DATA_REFUSED,  # noqa: F401
                                 TRAINING_FAILED)
from medgen.client.node import resolve_node
from medgen.client.worker_channel import ask, uses_warm_trainer
from medgen.config import RunConfig
from medgen.deploy.allowlist import NOT_ALLOWED, AllowListError, NotAllowed, enforce_node_allow_list
from medgen.privacy.client_dp import client_clipping_mod
from medgen.privacy.message_audit import OUTBOX_FILE, record_outbox
from medgen.privacy.secagg import secure_aggregation_mod

log = logging.getLogger(__name__)

app = ClientApp()


def outbox_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The message audit (privacy/message_audit.py) writing to this node's state dir."""
    return record_outbox(msg, context, call_next, _outbox_file)


def _outbox_file(context: Context) -> Path:
    config = RunConfig.from_run_config(context.run_config)
    return resolve_node(config, context.node_config).state_dir / OUTBOX_FILE


# outbox_mod outermost: it records exactly what leaves the node (privacy/message_audit.py)
@app.train(mods=[outbox_mod, secure_aggregation_mod, client_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return Message(_answer("train", msg.content, context), reply_to=msg)


# the evaluate handler: outbox audit only (the clipping and SecAgg+ mods are for train)
@app.evaluate(mods=[outbox_mod])
def evaluate(msg: Message, context: Context) -> Message:
    return Message(_answer("evaluate", msg.content, context), reply_to=msg)


def _answer(verb: str, content: RecordDict, context: Context) -> RecordDict | Error:
    """The node, the allow-list, then the round: forwarded to the warm trainer or run here."""
    site = "unknown"
    failed_code = TRAINING_FAILED if verb == "train" else EVALUATION_FAILED
    try:
        config = RunConfig.from_run_config(context.run_config)
        node = resolve_node(config, context.node_config)
        site = node.site
        # the hospital's allow-list (deploy/allowlist.py): refuse before data, ledger or work
        enforce_node_allow_list(context.node_config, config, content.config_records.get("config"))
    except (NotAllowed, AllowListError) as err:
        log.warning("site %s: %s", site, err)  # AllowListError names the local file: log only
        reason = str(err) if isinstance(err, NotAllowed) else \
            "refused: this hospital's allow-list file is unreadable (see the node log)"
        return Error(NOT_ALLOWED, f"site {site}: {reason}")
    except Exception as err:  # noqa: BLE001 - every failure becomes a clean error reply
        log.error("site %s: %s failed:\n%s", site, verb, traceback.format_exc())
        noun = "training" if verb == "train" else "evaluation"
        return Error(failed_code, f"site {site}: {noun} failed with {type(err).__name__} "
                     "(details in the node log)")
    if uses_warm_trainer(context.node_config):
        return ask(node.state_dir, verb, context.run_config, context.node_config, content,
                   site=site, failed_code=failed_code)
    import medgen.client.rounds as rounds  # the cold path only: torch, MONAI, Opacus, the recipes

    return rounds.answer(verb, config, node, content)
