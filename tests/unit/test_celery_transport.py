"""The Celery engine's hardened kombu transport: what it makes of any list item (no Redis needed)."""

from __future__ import annotations

import base64
import json

from shared import celery_wire, tasks
from workers.engines.celery.transport import UNREADABLE, envelope

QUEUE = "infer.simple.cpu"


def test_a_real_message_passes_untouched():
    _, raw = celery_wire.task_message(tasks.PREDICT, "job-1", {"job": {}}, QUEUE, 0)
    assert envelope(raw, QUEUE) == json.loads(raw)


def test_anything_else_is_wrapped_with_its_raw_bytes_and_never_raises():
    for junk in (b"\xff\xfe", b"{not json", b"[1, 2]", b"null", b'{"body": 1}', b'{"properties": {}}', b"",
                 "text that is not json", b'{"body": "", "headers": [], "properties": {"delivery_tag": "t"}}'):
        wrapped = envelope(junk, QUEUE)
        assert wrapped["content-type"] == UNREADABLE
        assert wrapped["properties"]["delivery_info"]["routing_key"] == QUEUE
        raw = junk if isinstance(junk, bytes) else junk.encode()
        assert base64.b64decode(wrapped["body"]) == raw


def test_an_envelope_without_delivery_info_keeps_its_job_id():
    raw = json.dumps({"body": "e30=", "headers": {"id": "job-2"}, "properties": {"delivery_tag": "t2"}})
    found = envelope(raw.encode(), QUEUE)
    assert found["headers"]["id"] == "job-2" and found["properties"]["delivery_info"]["routing_key"] == QUEUE
