"""Each pool's backlog on the API's /metrics against a real Redis: the count script runs on the real server, over
entries the batching engine's own fetch and kombu's form wrote."""

from __future__ import annotations

import json
import uuid

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from producer_api.app import create_app
from producer_api.security.keystore import KeyStore
from shared import routing
from shared.backlog import KOMBU_UNACKED
from shared.celery_wire import task_message
from shared.keys import Keys
from shared.settings import FleetSettings
from tests.integration.conftest import TEST_DB
from workers.engines.batching.fetch import UNACKED_INDEX, BatchFetcher

pytestmark = pytest.mark.integration

QUEUE, OTHER = routing.queue_name("simple", "cuda"), routing.queue_name("triton", "cuda")


@pytest.fixture()
def settings(redis_server, tmp_path) -> FleetSettings:
    return FleetSettings(_env_file=None, redis_url=redis_server.url(TEST_DB), model_store_dir=tmp_path,
                         redis_key_prefix=f"it-backlog-{uuid.uuid4().hex[:8]}")


def backlog(text: str) -> dict[tuple[str, str], float]:
    """(queue, kind) -> value of fleet_pool_backlog, and (queue, "total") of fleet_pool_backlog_total."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fleet_pool_backlog":
                out[(sample.labels["queue"], sample.labels["kind"])] = sample.value
            elif sample.name == "fleet_pool_backlog_total":
                out[(sample.labels["queue"], "total")] = sample.value
    return out


async def test_metrics_count_every_kind_of_a_pools_backlog(aiohttp_client, settings) -> None:
    keys, sync = Keys(settings.redis_key_prefix), redis_lib.Redis.from_url(settings.redis_url)
    sync.delete(*routing.redis_list_keys(QUEUE))  # the tier owns this db; these pool lists are this test's
    client = Redis.from_url(settings.redis_url)
    try:
        secret = await KeyStore(client, keys).create("backlog", ["admin"], "1000000/minute")
    finally:
        await client.aclose()
    api = await aiohttp_client(create_app(settings), headers={"X-API-Key": secret})
    tags: list[str] = []
    try:
        before = backlog(await (await api.get("/metrics")).text())
        for n, priority in enumerate((0, 3, 9)):  # queued: one message on each of three priority lists
            sync.lpush(*task_message("fleet.predict", f"q{n}", {"job": {}}, QUEUE, priority))
        member = f"w-{uuid.uuid4().hex[:6]}"  # routed: two messages in a routing member's own queue
        sync.zadd(keys.routing_members(QUEUE), {member: 0.0})
        for n, priority in enumerate((0, 6)):
            sync.lpush(routing.priority_list(keys.worker_queue(member), priority),
                       task_message("fleet.predict", f"r{n}", {"job": {}}, QUEUE, priority)[1])
        # in hand: two taken by the batching engine's fetch, one reserved by a Celery consumer of another pool
        fetched = BatchFetcher(sync, routing.redis_list_keys(QUEUE), keys, member, 60, 2).fetch(block_s=0)
        tags += [json.loads(raw)["properties"]["delivery_tag"] for raw in fetched.raws]
        assert len(tags) == 2
        raw = task_message("fleet.predict", "c1", {"job": {}}, OTHER, 0)[1]
        tags.append(f"tag-{uuid.uuid4().hex}")
        sync.hset(KOMBU_UNACKED, tags[-1], json.dumps([json.loads(raw), "infer", OTHER]))
        after = backlog(await (await api.get("/metrics")).text())
        delta = {k: after[k] - before.get(k, 0) for k in after}
        assert (delta[(QUEUE, "queued")], delta[(QUEUE, "routed")], delta[(QUEUE, "in_hand")]) == (1, 2, 2)
        assert delta[(QUEUE, "total")] == 5 and delta[(OTHER, "in_hand")] == 1 and delta[(OTHER, "total")] == 1
    finally:
        if tags:
            sync.hdel(KOMBU_UNACKED, *tags)
            sync.zrem(UNACKED_INDEX, *tags)
        sync.delete(*routing.redis_list_keys(QUEUE), *sync.keys(f"{settings.redis_key_prefix}:*"))
        sync.close()
