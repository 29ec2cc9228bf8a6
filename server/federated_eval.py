"""The coordinator's side of federated evaluation: ask the sites, check their scalars, log.

After a round listed in ``RunConfig.federated_eval_rounds`` every connected node gets an
EVALUATE message (the new global weights, the run key, the absolute round; the ClientApp's
``evaluate`` handler, client/app.py). A site answers with ONE MetricRecord of DP-released
scalars (evaluation/federated_eval.py) and its epsilon after that release. A reply is
checked like a train reply (server/validation.py): an error reply, structure (one
MetricRecord, nothing else), every metric a finite number, ``site-index`` naming a site,
the node bound to that site in this run (server/site_binding.py; a node that never
trained in this run speaks for no site), epsilon in (0, target] and the run's delta, and
the scalars present. Accepted scalars go, per site, into metrics.jsonl (``kind:
"federated-eval"``) and run-dir/federated_eval.json (written atomically); rejected ones are
listed with their reason. The epsilon of an accepted reply reaches privacy.json.

Used by both round loops: the plain strategy's configure_evaluate/aggregate_evaluate
(server/strategy.py) and the SecAgg+ rounds (server/secure_rounds.py), which send the same
message directly (the scalars are already DP-released: masking them would add nothing).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from medgen.atomic import append_line, atomic_write_json
from medgen.config import RunConfig
from medgen.privacy.site_update import RejectedReply
from medgen.server.site_binding import SiteBinding
from medgen.server.validation import SITE_KEY, ReplyValidator, SiteReply

KIND = "federated-eval"
FILE = "federated_eval.json"
SCALARS = ("fed-tissue-bands", "fed-tissue-bands-floor", "fed-tissue-bands-sd",
           "fed-tissue-bands-floor-sd", "fed-noise-multiplier")


@dataclass
class FederatedEvaluation:
    """Builds the evaluate messages of a round and judges their replies (module docstring)."""

    config: RunConfig
    validator: ReplyValidator
    binding: SiteBinding
    run_dir: Path | None

    def due(self, absolute: int) -> bool:
        return absolute in self.config.federated_eval_rounds

    def content(self, absolute: int, arrays: ArrayRecord, base: dict[str, Any]) -> RecordDict:
        config = ConfigRecord({**base, "absolute-round": int(absolute)})
        return RecordDict({"arrays": arrays, "config": config})

    def messages(self, node_ids: Iterable[int], absolute: int, arrays: ArrayRecord,
                 base: dict[str, Any]) -> list[Message]:
        record = self.content(absolute, arrays, base)
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=int(n))
                for n in node_ids]

    def judge(self, node: int, msg: Message) -> tuple[str, dict[str, float] | str]:
        """(site or sender, accepted scalars or the reason for refusing them)."""
        sender = self.binding.name_of(node)
        if msg.has_error():
            return sender, f"site replied with an error: {msg.error.reason}"
        content = msg.content
        if len(content.metric_records) != 1 or content.array_records or content.config_records:
            return sender, "an evaluate reply must hold exactly one MetricRecord and nothing else"
        claim = self.validator.claim(SiteReply(node, metrics=next(iter(content.metric_records.values()))),
                                     self.binding.name_of)
        if isinstance(claim, RejectedReply):
            return sender, claim.reason
        bound = self.binding.site_of_node.get(int(node))
        if bound != claim.site:
            return sender, (f"node {node} claimed site {claim.site} but is "
                            f"{'bound to ' + bound if bound else 'bound to no site'} in this run")
        why = self.validator.privacy_problem(claim)
        if why:
            return claim.site, why
        missing = [k for k in SCALARS if k not in claim.metrics]
        if missing:
            return claim.site, f"evaluate reply lacks {missing}"
        return claim.site, {k: v for k, v in claim.metrics.items() if k != SITE_KEY}

    def collect(self, absolute: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Judge every reply, log the round; the accepted scalars as '<key>/<site>'."""
        per_site: dict[str, dict[str, float]] = {}
        excluded: list[dict[str, str]] = []
        for msg in replies:
            site, verdict = self.judge(int(msg.metadata.src_node_id), msg)
            if isinstance(verdict, str):
                excluded.append({"site": site, "reason": verdict})
            elif site in per_site:
                excluded.append({"site": site, "reason": "a second evaluate reply for this site"})
            else:
                per_site[site] = verdict
        self.log(absolute, per_site, excluded)
        flat = {f"{k}/{site}": v for site, metrics in per_site.items() for k, v in metrics.items()}
        return MetricRecord(flat) if flat else None

    def log(self, absolute: int, per_site: dict[str, dict[str, float]], excluded: list[dict[str, str]]) -> None:
        if self.run_dir is None:
            return
        record = {"round": int(absolute), "kind": KIND, "time": time.time(), "per_site": per_site,
                  "excluded": excluded}
        append_line(self.run_dir / "metrics.jsonl", json.dumps(_finite(record), sort_keys=True))
        path = self.run_dir / FILE
        rounds = json.loads(path.read_text()) if path.exists() else {}
        rounds[str(int(absolute))] = {"per_site": per_site, "excluded": excluded}
        atomic_write_json(path, _finite(rounds))


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj
