"""The shared job-watch connection: multiplexing, final-message detection, and the store-check cache."""

from __future__ import annotations

import asyncio
import json

import pytest

from producer_api.records import JobRecords
from producer_api.watch import JobChannels, JobWatch, announces_final
from shared.jobs import event_message
from tests.unit.test_api_helpers import KEYS, PREDICT, aredis, client, celery, server, settings, sredis  # noqa: F401


def _meta(status: str, result: object = None) -> bytes:
    # the key order Celery's backend (and the fleet's outcome writer) uses
    return json.dumps({"status": status, "result": result, "traceback": None, "children": [],
                       "date_done": "2026-01-01T00:00:00", "task_id": "j"}).encode()


@pytest.mark.parametrize("channel, data, final", [
    (KEYS.celery_result("j"), _meta("SUCCESS", {"status": "queued", "predictions": [[1.0]]}), True),
    (KEYS.celery_result("j"), _meta("FAILURE"), True),
    (KEYS.celery_result("j"), _meta("PROGRESS", {"done": 1, "total": 2}), False),
    (KEYS.job_events("j"), event_message("j", "queued").encode(), False),
    (KEYS.job_events("j"), event_message("j", "running").encode(), False),
    (KEYS.job_events("j"), event_message("j", "cancelled").encode(), True),
    (KEYS.job_events("j"), b"not json at all", True),  # unreadable: re-read, the safe side
    ("", b"", True),  # the connection was lost
])
def test_final_messages_are_told_apart_without_parsing_the_result(channel, data, final):
    assert announces_final(channel, data) is final


async def test_watchers_share_one_subscription_and_each_gets_its_messages(aredis, sredis):
    channels = JobChannels(aredis, KEYS.api_watch_idle())
    records = JobRecords(aredis, KEYS, 60)
    try:
        async with JobWatch(channels, records, "a") as a1, JobWatch(channels, records, "a") as a2, \
                JobWatch(channels, records, "b") as b:
            assert sredis.pubsub_numsub(KEYS.celery_result("a"))[0][1] == 1  # one subscriber for two watchers
            sredis.publish(KEYS.celery_result("a"), _meta("SUCCESS"))
            sredis.publish(KEYS.job_events("b"), event_message("b", "running"))
            got_a1, got_a2, got_b = await asyncio.wait_for(
                asyncio.gather(a1.queue.get(), a2.queue.get(), b.queue.get()), 2)
            assert got_a1 == got_a2 == (KEYS.celery_result("a"), _meta("SUCCESS"))
            assert got_b[0] == KEYS.job_events("b") and b.queue.empty()
        for _ in range(100):  # the last watcher gone, the channels are unsubscribed
            if sredis.pubsub_numsub(KEYS.celery_result("a"))[0][1] == 0:
                break
            await asyncio.sleep(0.01)
        assert sredis.pubsub_numsub(KEYS.celery_result("a"), KEYS.job_events("b")) == [
            (KEYS.celery_result("a").encode(), 0), (KEYS.job_events("b").encode(), 0)]
    finally:
        await channels.close()


async def test_store_is_checked_once_per_model_not_per_request(client, monkeypatch):
    from shared import store_layout

    calls = []
    original = store_layout.model_dir
    monkeypatch.setattr(store_layout, "model_dir", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    for _ in range(5):
        assert (await client.post("/v1/predict", json=PREDICT)).status == 202
    assert len(calls) == 1
    # a model missing from the store is looked up every time (it may be added at any moment)
    for _ in range(2):
        assert (await client.post("/v1/predict", json={**PREDICT, "symbol": "MSFT"})).status == 404
    assert len(calls) == 3
