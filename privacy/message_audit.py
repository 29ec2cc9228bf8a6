"""Message audit: record the structure of every message a site sends, and check it.

``record_outbox`` is the body of a Flower client mod; the ClientApp composes it with its
node's outbox file (client/app.py ``outbox_mod``, placed OUTERMOST on the train handler
so it sees exactly what leaves the node, after every other mod, SecAgg+ masking
included). For each reply it appends one JSON line to ``<node state dir>/outbox.jsonl``:
the record names, every array's shape and dtype (never its values), every metric's
value, and for config records the type and size of each value (strings verbatim, so
the checker can inspect them; the file never leaves the node). If the line cannot be
written the reply is replaced by an error: an unrecorded message does not leave.

``check_outbox`` then proves, message by message, that only the expected traffic left:
- a plain train reply: one ArrayRecord holding exactly the expected weight arrays (keys,
  shapes, dtypes) and one MetricRecord of finite scalar numbers, no ConfigRecord;
- an evaluate reply (federated evaluation, evaluation/federated_eval.py): one MetricRecord
  of finite scalar numbers and nothing else (no array, no config);
- a SecAgg+ reply (privacy/secagg.py): Flower's protocol record (keys, public keys,
  encrypted shares, node ids, and the masked weight vector, whose arrays must have the
  expected weights' shapes), the legacy result records with scalar metrics, and the one
  fixed status string;
- an error reply: a reason that names no path or file;
- nowhere: an array shaped like an image (trailing image-size x image-size, not an
  expected weight), or a string holding a path, a file name or anything but the allowed
  fixed texts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from medgen.atomic import append_line

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.jsonl"
OUTBOX_FAILED = 4011     # (client/app.py 4001-4002, deploy/allowlist.py 4003)
HANDLER_FAILED = 4012
PLAIN_RECORDS = {"arrays", "metrics"}
#: what a SecAgg+ reply may hold besides the protocol record (Flower's legacy FitRes)
LEGACY_RECORDS = {"fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"}
SECAGG_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
               Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}
ALLOWED_STRINGS = {("fitres.status", "message"): {"", "Success"}}
PATH_LIKE = re.compile(r"[/\\]|\.(nii|gz|dcm|png|jpe?g|npy|pt|json|csv|txt)\b|^[A-Za-z]:", re.I)


class ArraySpec(Protocol):
    """What the checker needs of an expected weight (server/strategy.py ``ArraySpec`` is one)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Violation:
    message: int          # line number in the outbox (0-based)
    where: str            # record/key
    reason: str

    def __str__(self) -> str:
        return f"message {self.message}, {self.where}: {self.reason}"


# -- recording ----------------------------------------------------------------------------
def describe_message(msg: Message) -> dict[str, Any]:
    """The structure of an outgoing message (never array values)."""
    if msg.has_error():
        return {"error": {"code": int(msg.error.code), "reason": str(msg.error.reason)}}
    content = msg.content
    return {
        "arrays": {name: {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()}
                   for name, record in content.array_records.items()},
        "metrics": {name: {k: _describe_value(v) for k, v in record.items()}
                    for name, record in content.metric_records.items()},
        "configs": {name: {k: _describe_config(name, k, v) for k, v in record.items()}
                    for name, record in content.config_records.items()},
    }


def _describe_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "bool"}
    if isinstance(value, (int, float)):
        return {"type": type(value).__name__, "value": value if math.isfinite(value) else str(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes):
        return {"type": "bytes", "len": len(value)}
    if isinstance(value, list):
        return {"type": "list", "len": len(value),
                "items": sorted({type(v).__name__ for v in value}),
                "strings": [v for v in value if isinstance(v, str)]}
    return {"type": type(value).__name__}


def _describe_config(record: str, key: str, value: Any) -> dict[str, Any]:
    described = _describe_value(value)
    if record == RECORD_KEY_CONFIGS and key == Key.MASKED_PARAMETERS and isinstance(value, list):
        arrays = [bytes_to_ndarray(b) for b in value]  # shapes only: values are masked
        described["arrays"] = [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]
    return described


def record_outbox(msg: Message, context: Context, call_next: ClientAppCallable,
                  outbox_file: Callable[[Context], Path]) -> Message:
    """Client mod body: record every outgoing reply's structure (in ``outbox_file(context)``)
    before it leaves the node.

    An exception inside the app would otherwise reach Flower, whose error reply carries
    the exception text (which may name local files): it becomes a fixed sentence here.
    """
    try:
        reply = call_next(msg, context)
    except Exception:  # noqa: BLE001
        log.exception("the ClientApp failed on a %s message", msg.metadata.message_type)
        reply = Message(Error(HANDLER_FAILED, "the node failed to handle this message (details in "
                              "the node log)"), reply_to=msg)
    try:
        record = {"message_type": str(msg.metadata.message_type), **describe_message(reply)}
        append_line(outbox_file(context), json.dumps(record, sort_keys=True))
    except Exception:  # noqa: BLE001 - fail closed: nothing unrecorded leaves
        log.exception("message audit: could not record the outgoing reply; sending an error")
        return Message(Error(OUTBOX_FAILED, "the node could not record this reply in its "
                             "message audit; nothing was sent (see the node log)"), reply_to=msg)
    return reply


def read_outbox(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no message audit (was outbox_mod on the ClientApp?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- checking -----------------------------------------------------------------------------
def check_outbox(records: Sequence[Mapping[str, Any]], expected: Mapping[str, ArraySpec],
                 image_size: int) -> list[Violation]:
    """Every violation in a node's outbox (empty: only expected traffic left)."""
    out: list[Violation] = []
    for i, record in enumerate(records):
        out += [Violation(i, where, why) for where, why in _check_one(record, expected, image_size)]
    return out


def _check_one(record, expected, image_size):
    if "error" in record:
        reason = record["error"]["reason"]
        if PATH_LIKE.search(reason):
            yield "error.reason", f"error reason looks like it names a path or file: {reason!r}"
        return
    arrays, metrics, configs = record["arrays"], record["metrics"], record["configs"]
    if record.get("message_type") == MessageType.EVALUATE:
        yield from _check_evaluate_reply(arrays, metrics, configs)
        return
    secure = RECORD_KEY_CONFIGS in configs
    allowed = (LEGACY_RECORDS | {RECORD_KEY_CONFIGS}) if secure else PLAIN_RECORDS
    for name in [*arrays, *metrics, *configs]:
        if name not in allowed:
            yield name, f"unexpected record {name!r} (allowed here: {sorted(allowed)})"
    for name, record_arrays in arrays.items():
        if secure and record_arrays:
            yield name, "a SecAgg+ reply carries weights in the clear"
        yield from _check_arrays(name, record_arrays, expected, image_size)
    if not secure and len(arrays) != 1:
        yield "arrays", f"a train reply must hold exactly one ArrayRecord, got {len(arrays)}"
    for name, values in metrics.items():
        for key, value in values.items():
            yield from _check_scalar(f"{name}.{key}", value)
    for name, values in configs.items():
        for key, value in values.items():
            yield from _check_config(name, key, value, expected, image_size)


def _check_evaluate_reply(arrays, metrics, configs):
    # federated evaluation releases DP scalars only: any array or string would be new traffic
    for name in [*arrays, *configs]:
        yield name, f"an evaluate reply carries a {'n array' if name in arrays else ' config'} record {name!r}"
    if set(metrics) != {"metrics"}:
        yield "metrics", f"an evaluate reply must hold exactly one MetricRecord 'metrics', got {sorted(metrics)}"
    for name, values in metrics.items():
        for key, value in values.items():
            yield from _check_scalar(f"{name}.{key}", value)


def _check_arrays(name, arrays, expected, image_size):
    for key, spec in arrays.items():
        shape, where = tuple(spec["shape"]), f"{name}.{key}"
        want = expected.get(key)
        if want is None:
            yield where, f"array {key!r} is not one of the model's shared weights"
        elif (shape, spec["dtype"]) != (want.shape, want.dtype):
            yield where, f"array is {shape} {spec['dtype']}, the shared weight is {want.shape} {want.dtype}"
        if _image_like(shape, image_size) and (want is None or want.shape != shape):
            yield where, f"array shaped like an image {shape} (image size {image_size})"


def _image_like(shape: tuple[int, ...], size: int) -> bool:
    return len(shape) >= 2 and shape[-2:] == (size, size) and (len(shape) == 2 or shape[-3] <= 4)


def _check_scalar(where, value):
    if value["type"] not in ("int", "float"):
        yield where, f"metric must be a single number, got {value['type']}"
    elif isinstance(value.get("value"), str):
        yield where, f"metric is not finite ({value['value']})"


def _check_config(name, key, value, expected, image_size):
    where = f"{name}.{key}"
    if value["type"] == "str" or value.get("strings"):
        texts = [value["value"]] if value["type"] == "str" else value["strings"]
        allowed = ALLOWED_STRINGS.get((name, key), set())
        for text in texts:
            if text not in allowed:
                yield where, f"string leaves the node: {text!r}" + (
                    " (looks like a path or file name)" if PATH_LIKE.search(text) else "")
    if name == RECORD_KEY_CONFIGS:
        if key not in SECAGG_KEYS:
            yield where, f"unexpected SecAgg+ key {key!r}"
        if key == Key.MASKED_PARAMETERS:
            yield from _check_masked(where, value.get("arrays", []), expected, image_size)
    elif name == "fitres.metrics":
        yield from _check_scalar(where, value)


def _check_masked(where, arrays, expected, image_size):
    # Flower prepends the quantised weight factor as a 1-element array
    shapes = [tuple(a["shape"]) for a in arrays[1:]]
    want = [spec.shape for spec in expected.values()]
    if not arrays or tuple(arrays[0]["shape"]) != (1,):
        yield where, "masked vector does not start with the 1-element weight factor"
    if sorted(shapes) != sorted(want):
        yield where, f"masked vector has shapes {shapes[:4]}..., not the shared weights' shapes"
    for shape in shapes:
        if _image_like(shape, image_size) and shape not in want:
            yield where, f"masked array shaped like an image {shape}"


def audit_node_outboxes(state_root: Path, sites: Sequence[str], expected: Mapping[str, ArraySpec],
                        image_size: int) -> dict[str, list[Violation]]:
    """Check ``<state_root>/<site>/outbox.jsonl`` for every site; {site: violations}."""
    return {site: check_outbox(read_outbox(Path(state_root) / site / OUTBOX_FILE), expected, image_size)
            for site in sites}
