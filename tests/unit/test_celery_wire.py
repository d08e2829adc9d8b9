"""Celery task messages built and read without Celery's producer (the envelope kombu's Redis transport stores)."""

from __future__ import annotations

import base64
import json
import pickle

import pytest

from shared import celery_wire, tasks
from shared.errors import InvalidInputError


def test_a_built_message_reads_back() -> None:
    job = {"symbol": "AAPL", "inputs": {"tensor": {"shape": [2, 1], "data": b"\x00" * 8}}}
    key, raw = celery_wire.task_message(tasks.PREDICT, "job-1", {"job": job}, "infer.simple.cpu", 4,
                                        kwargsrepr="{'job': <predict AAPL>}")
    assert key == "infer.simple.cpu\x06\x163"
    msg = celery_wire.read_message(raw)
    assert (msg.task, msg.task_id, msg.kwargs) == (tasks.PREDICT, "job-1", {"job": job})
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/x-msgpack" and envelope["properties"]["priority"] == 4
    assert envelope["headers"]["kwargsrepr"] == "{'job': <predict AAPL>}"
    assert celery_wire.message_ids(raw) == (msg.tag, "job-1")
    _, other = celery_wire.task_message(tasks.PREDICT, "job-1", {"job": job}, "infer.simple.cpu", 4)
    assert celery_wire.read_message(other).tag != msg.tag  # every message has its own delivery tag


def test_a_pickled_body_is_never_unpickled() -> None:
    _, raw = celery_wire.task_message(tasks.PREDICT, "job-2", {"job": {}}, "infer.simple.cpu", 0)
    envelope = json.loads(raw)
    envelope["content-type"] = "application/x-python-serialize"
    envelope["body"] = base64.b64encode(pickle.dumps(((), {"job": {}}, {}))).decode()
    forged = json.dumps(envelope)
    with pytest.raises(InvalidInputError, match="not accepted"):
        celery_wire.read_message(forged)
    assert celery_wire.message_ids(forged)[1] == "job-2"  # its job can still be failed by id


@pytest.mark.parametrize("raw", [b"\x80 not json", b"[]", b'{"properties": "x"}', b'{"properties": {}}'])
def test_ids_of_something_that_is_not_a_kombu_envelope(raw: bytes) -> None:
    assert celery_wire.message_ids(raw) == ("unknown", None)
