"""The shared job-watch connection: multiplexing, final-message detection, and the store-check cache."""

from __future__ import annotations

import asyncio

import pytest

from producer_api.records import JobRecords
from producer_api.watch import JobChannels, JobWatch, announces_final
from shared.jobs import event_message
from tests.unit.test_api_helpers import KEYS, PREDICT, aredis, client, celery, server, settings, sredis  # noqa: F401


@pytest.mark.parametrize("channel, data, final", [
    (KEYS.job_events("j"), event_message("j", "queued").encode(), False),
    (KEYS.job_events("j"), event_message("j", "running").encode(), False),
    (KEYS.job_events("j"), event_message("j", "progress", progress={"done": 1, "total": 2}).encode(), False),
    (KEYS.job_events("j"), b'{"job_id":"j","status":"running","ts":1.5}', False),  # as the begin script writes it
    (KEYS.job_events("j"), event_message("j", "succeeded").encode(), True),
    (KEYS.job_events("j"), event_message("j", "failed", error={"type": "X", "message": "m"}).encode(), True),
    (KEYS.job_events("j"), event_message("j", "cancelled").encode(), True),
    (KEYS.job_events("j"), b"not json at all", True),  # unreadable: re-read, the safe side
    (KEYS.job_events("j"), b"[1, 2]", True),
    ("", b"", True),  # the connection was lost
])
def test_final_events_are_told_by_their_status_field(channel, data, final):
    assert announces_final(channel, data) is final


async def test_watchers_share_one_subscription_and_each_gets_its_messages(aredis, sredis):
    channels = JobChannels(aredis, KEYS.api_watch_idle())
    records = JobRecords(aredis, KEYS, 60)
    try:
        async with JobWatch(channels, records, "a") as a1, JobWatch(channels, records, "a") as a2, \
                JobWatch(channels, records, "b") as b:
            assert sredis.pubsub_numsub(KEYS.job_events("a"))[0][1] == 1  # one subscriber for two watchers
            final = event_message("a", "succeeded")
            sredis.publish(KEYS.job_events("a"), final)
            sredis.publish(KEYS.job_events("b"), event_message("b", "running"))
            got_a1, got_a2, got_b = await asyncio.wait_for(
                asyncio.gather(a1.queue.get(), a2.queue.get(), b.queue.get()), 2)
            assert got_a1 == got_a2 == (KEYS.job_events("a"), final.encode())
            assert got_b[0] == KEYS.job_events("b") and b.queue.empty()
        for _ in range(100):  # the last watcher gone, the channels are unsubscribed
            if sredis.pubsub_numsub(KEYS.job_events("a"))[0][1] == 0:
                break
            await asyncio.sleep(0.01)
        assert sredis.pubsub_numsub(KEYS.job_events("a"), KEYS.job_events("b")) == [
            (KEYS.job_events("a").encode(), 0), (KEYS.job_events("b").encode(), 0)]
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
