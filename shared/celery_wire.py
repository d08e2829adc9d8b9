"""Celery task messages as kombu's Redis transport stores them: built and read without Celery's producer.

Why: ``send_task`` through kombu costs the API more CPU per job than everything else it does together (a
thread hop, a pooled channel, ``saferepr`` of the arguments, a second JSON pass over the body) and one Redis
round trip of its own. Building the same message here lets the API push it in the MULTI that writes the job's
``queued`` record, so that a job is recorded and enqueued atomically in one round trip.

The format is Celery's task protocol 2 inside kombu's Redis envelope (``kombu.transport.redis``): a JSON object
with the base64 body, its content type, the task headers and the delivery properties; the list is the queue's
name, suffixed with kombu's separator and the step for a priority step above 0. Celery workers, Flower and the
batching engine read it like any other message (``tests/unit/test_celery_wire.py`` compares it with what
``send_task`` writes).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from shared import routing
from shared.errors import InvalidInputError

MSGPACK = "application/x-msgpack"
JSON = "application/json"
#: Content types a consumer decodes; anything else (pickle above all) is refused.
DECODABLE = frozenset({MSGPACK, "application/msgpack", JSON})
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_message(task: str, task_id: str, kwargs: dict[str, Any], queue: str, broker_priority: int,
                 kwargsrepr: str = "") -> tuple[str, bytes]:
    """One task message, msgpack-encoded: returns ``(list key, raw message)`` for an LPUSH.

    ``kwargsrepr`` is what Flower shows for the arguments (Celery would ``saferepr`` the whole payload).
    """
    body = msgpack.packb([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                         use_bin_type=True)
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "binary",
        "content-type": MSGPACK,
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": "()", "kwargsrepr": kwargsrepr or "{'job': ...}", "origin": _ORIGIN,
            # NOTE: None, not False: Celery 5.7 workers let an explicit False override the task's own
            # ignore_result, and the predict task stores its result itself (a second write would replace it).
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": broker_priority,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return routing.priority_list(queue, broker_priority), orjson.dumps(envelope)


@dataclass
class TaskMessage:
    """What a consumer needs of one message."""

    tag: str
    task_id: str
    task: str
    kwargs: dict[str, Any]


def message_ids(raw: bytes | str) -> tuple[str, str | None]:
    """The message's delivery tag and task id, read from the envelope alone (the body may be unreadable):
    ``("unknown", None)`` for something that is not a kombu envelope."""
    try:
        envelope = orjson.loads(raw)
        tag = envelope["properties"]["delivery_tag"]
    except Exception:
        return "unknown", None
    task_id = (envelope.get("headers") or {}).get("id") if isinstance(envelope.get("headers"), dict) else None
    return str(tag), task_id if isinstance(task_id, str) else None


def read_message(raw: bytes | str) -> TaskMessage:
    """A stored message -> its tag, task id, task name and keyword arguments.

    Raises:
        InvalidInputError: a content type other than JSON or msgpack (nothing is ever unpickled).
        ValueError, KeyError, TypeError: not a kombu envelope.
    """
    envelope = orjson.loads(raw)  # kombu's envelope: plain JSON, never NaN
    headers, props = envelope.get("headers") or {}, envelope["properties"]
    body = envelope["body"]
    if props.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    ctype = envelope.get("content-type", "")
    if ctype not in DECODABLE:
        raise InvalidInputError(f"content type {ctype!r} is not accepted (json or msgpack only)")
    args, kwargs, _ = json.loads(body) if ctype == JSON else msgpack.unpackb(body, raw=False)
    return TaskMessage(props["delivery_tag"], headers.get("id") or props["delivery_tag"], headers.get("task", ""),
                       kwargs if isinstance(kwargs, dict) else {})
