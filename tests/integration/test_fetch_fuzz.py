"""Property-based: random and mutated kombu envelopes thrown at the batching engine's fetch script (real Redis)
and at the decoders never raise. Every message the fetch takes comes back either begun or marked unreadable,
and the consumer's decoding turns each into a delivery to run, a typed refusal or a quarantined dead letter."""

from __future__ import annotations

import base64
import json
import types
import uuid
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import celery_wire, routing, tasks
from shared.keys import Keys
from workers.engines.batching.consumer import Consumer
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX, BatchFetcher

RUN = uuid.uuid4().hex[:8]
QUEUE = f"infer.fuzz-{RUN}.cpu"
LISTS = routing.redis_list_keys(QUEUE)
WORKER = f"w-fuzz-{RUN}|1"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
FIELDS = [("properties", "delivery_tag"), ("headers", "id"), ("headers", "task"), ("body",), ("content-type",),
          ("properties", "priority"), ("properties", "body_encoding"), ("properties",), ("headers",),
          ("properties", "delivery_info")]


def valid(job_id: str) -> dict[str, Any]:
    _, raw = celery_wire.task_message(tasks.PREDICT, job_id, {"job": {"symbol": "AAPL"}}, QUEUE, 0)
    return json.loads(raw)


@st.composite
def mutated(draw: Any) -> bytes:
    envelope = valid(f"fz-{uuid.uuid4().hex[:8]}")
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELDS))
        target = envelope
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = draw(json_values | st.sampled_from([
                base64.b64encode(b"\x80\x04pickle").decode(), "application/x-python-serialize",
                base64.b64encode(msgpack.packb([[], "not kwargs", {}])).decode(), "0x10", 1e308]))
    raw = json.dumps(envelope).encode()
    if draw(st.booleans()):  # break the bytes themselves: invalid UTF-8, truncation, Lua-cjson-only syntax
        raw = draw(st.sampled_from([raw[: len(raw) // 2], raw.replace(b'"', b"\xff", 1), raw + b"\xc3",
                                    raw.replace(b": 0", b": 0x10", 1)]))
    return raw


messages = st.lists(st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()) | mutated(),
                    min_size=1, max_size=6)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raws=messages)
def test_no_message_breaks_the_fetch_or_the_decoders(raws: list[bytes], redis_client, fleet_settings) -> None:
    keys = Keys(fleet_settings.redis_key_prefix)
    fetcher = BatchFetcher(redis_client, LISTS, keys, WORKER, 60, max_messages=4)
    fake_consumer = types.SimpleNamespace(queue=QUEUE)
    try:
        for raw in raws:
            redis_client.lpush(LISTS[-1], raw)
        seen = 0
        while seen < len(raws):
            batch = fetcher.fetch(block_s=0.1)
            assert batch.raws, "a message was left behind"
            assert len(batch.begun) == len(batch.raws)
            seen += len(batch.raws)
            for raw in batch.raws:
                celery_wire.message_ids(raw)  # never raises
            deliveries, begun, quarantined = Consumer.decode(fake_consumer, batch)
            assert len(deliveries) + len(quarantined) == len(batch.raws)
            for delivery in deliveries:  # to run, or refused with a typed error (an unknown task fails typed too)
                assert delivery.refused is None or delivery.refused.to_dict()["type"], delivery
            for letter in quarantined:
                assert json.loads(letter)["reason"] == "unreadable"
        assert seen == len(raws)
    finally:
        tags = [t.decode() for t in redis_client.hkeys(keys.worker_deliveries(WORKER))]
        pipe = redis_client.pipeline()
        pipe.delete(*LISTS, keys.worker_deliveries(WORKER))
        if tags:
            pipe.hdel(UNACKED, *tags).zrem(UNACKED_INDEX, *tags)
        pipe.execute()
