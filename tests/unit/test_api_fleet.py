"""Models, stats, health, readiness and metrics, read from hashes written by the real ``StatsWriter``."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer_api.app import create_app
from shared import routing
from shared.backlog import KOMBU_UNACKED
from shared.celery_wire import task_message
from shared.keys import WORKER_HEARTBEAT_TTL_S
from shared.schemas import ModelInfo
from shared.stats import JobOutcome, StatsWriter
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, enqueue, server,  # noqa: F401
                                         settings, sredis)

MODEL = "AAPL_1h_patchtst"


def _info(model_id: str = MODEL, memory: float = 10.0) -> ModelInfo:
    return ModelInfo(model_id=model_id, symbol="AAPL", timeframe="1h", model_type=model_id.rsplit("_", 1)[1],
                     model_path="/store", is_loaded=True, memory_usage_mb=memory)


@pytest.fixture
def fleet(sredis):
    """Two live workers (one holding the model, on infer.simple.cpu) and one whose heartbeat is stale."""
    live = StatsWriter(sredis, KEYS, "alpha@host|11", started_at=time.time() - 100)
    live.heartbeat([_info()], queues="infer.simple.cpu")
    live.record([JobOutcome(MODEL, True, 4.0), JobOutcome(MODEL, True, 40.0), JobOutcome(MODEL, False, 1.0)],
                cache={"hits": 3, "misses": 1, "evictions_memory": 2})
    idle = StatsWriter(sredis, KEYS, "beta@host|12")
    idle.heartbeat([], queues="infer.torchscript.cuda")
    stale = StatsWriter(sredis, KEYS, "gone@host|13")
    stale.heartbeat([_info()], now=time.time() - WORKER_HEARTBEAT_TTL_S - 5, queues="infer.simple.cpu")
    return sredis


async def test_models_lists_the_store_with_live_holders(client, fleet):
    body = await (await client.get("/v1/models")).json()
    by_id = {m["model_id"]: m for m in body["models"]}
    assert set(by_id) == {"AAPL_1h_patchtst", "AAPL_1h_sentiment"}
    assert by_id[MODEL]["versions"] == ["1", "2"] and by_id[MODEL]["latest"] == "2"
    assert by_id[MODEL]["meta"] == {"trained_on": "2"}
    assert by_id[MODEL]["loaded_on"] == ["alpha@host|11"]
    assert by_id["AAPL_1h_sentiment"]["loaded_on"] == []


async def test_stats_for_fleet_workers_and_models(client, fleet):
    body = await (await client.get("/v1/stats")).json()
    assert set(body["workers"]) == {"alpha@host|11", "beta@host|12"}
    fleet_stats = body["fleet"]
    assert fleet_stats["total_predictions"] == 3 and fleet_stats["successful_predictions"] == 2
    assert fleet_stats["average_inference_time_ms"] == pytest.approx(22.0)
    assert fleet_stats["models_loaded"] == 1 and fleet_stats["total_memory_mb"] == 10.0
    assert fleet_stats["cache_hit_ratio"] == 0.75
    model = body["models"][MODEL]
    assert model["failed_predictions"] == 1 and model["models_loaded"] == 1
    assert model["latency_histogram_ms"]["5"] == 1 and model["latency_histogram_ms"]["+Inf"] == 2
    assert body["workers"]["alpha@host|11"]["uptime_seconds"] >= 100


async def test_stats_on_an_empty_fleet(client):
    body = await (await client.get("/v1/stats")).json()
    assert body["workers"] == {} and body["models"] == {} and body["fleet"]["total_predictions"] == 0


async def test_healthz_is_always_200(client):
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_readyz_needs_a_live_worker_per_pool(client, sredis):
    resp = await client.get("/readyz")
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["type"] == "NotReadyError" and "infer.simple.cpu" in error["message"]
    StatsWriter(sredis, KEYS, "gone|1").heartbeat([], now=time.time() - 60, queues="infer.simple.cpu")
    assert (await client.get("/readyz")).status == 503
    # a live worker whose adapter failed to set up: not ready, and the reason is named
    StatsWriter(sredis, KEYS, "sick|3").heartbeat([], queues="infer.simple.cpu", healthy=0,
                                                  unhealthy_reason="simple:cpu: cuda is not available in this process")
    resp = await client.get("/readyz")
    message = (await resp.json())["error"]["message"]
    assert resp.status == 503 and "sick|3 unhealthy: simple:cpu: cuda is not available" in message, message
    StatsWriter(sredis, KEYS, "w|2").heartbeat([], queues="infer.simple.cpu,infer.simple.cuda", healthy=1)
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "workers": {"infer.simple.cpu": 1}}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_report_the_api_and_the_fleet(client, fleet):
    await enqueue(client)
    fleet.rpush("infer.simple.cpu", "m1", "m2")
    fleet.rpush("infer.simple.cpu\x06\x166", "m3")  # kombu's priority list name
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = _samples(await resp.text())
    assert samples[("fleet_api_jobs_total", (("kind", "predict"), ("status", "queued")))] == 1
    assert samples[("fleet_predictions_total", (("status", "ok"),))] == 2
    # the enqueued job's own message (priority step 3) plus the three pushed here
    assert samples[("fleet_queue_depth", (("queue", "infer.simple.cpu"),))] == 4
    assert samples[("fleet_queue_depth", (("queue", "infer.triton.cuda"),))] == 0
    assert samples[("fleet_inference_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("fleet_inference_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("fleet_inference_latency_seconds_count", ())] == 2
    assert samples[("fleet_inference_latency_seconds_sum", ())] == pytest.approx(0.044)
    assert samples[("fleet_models_loaded", ())] == 1 and samples[("fleet_workers_live", ())] == 2
    assert samples[("fleet_cache_hit_ratio", ())] == 0.75
    assert samples[("fleet_cache_evictions_total", (("reason", "memory"),))] == 2


async def test_metrics_export_each_pools_backlog_and_the_cache_load_counters(client, fleet):
    simple, triton = "infer.simple.cpu", "infer.triton.cpu"
    await enqueue(client)  # queued: the API's own message, on the priority-3 list
    fleet.rpush(f"{simple}\x06\x169", "m1")
    fleet.zadd(KEYS.routing_members(simple), {"alpha@host|11": 0.0})
    for step, job_id in ((0, "r1"), (6, "r2")):  # routed: two messages in a member's own queue
        fleet.lpush(routing.priority_list(KEYS.worker_queue("alpha@host|11"), step),
                    task_message("fleet.predict", job_id, {"job": {}}, simple, step)[1])
    for tag, queue in (("a", simple), ("b", simple), ("c", simple), ("d", triton)):  # in hand: unacked deliveries
        raw = task_message("fleet.predict", f"job-{tag}", {"job": {}}, queue, 0)[1]
        fleet.hset(KOMBU_UNACKED, tag, json.dumps([json.loads(raw), "infer", queue]))
    fleet.hset(KEYS.fleet_stats(), mapping={"cache_loads": 4, "cache_load_ms": 1500, "cache_evicted_age_s": 90})
    samples = _samples(await (await client.get("/metrics")).text())
    for queue, kinds in ((simple, {"queued": 2, "routed": 2, "in_hand": 3}), (triton, {"queued": 0, "routed": 0,
                                                                                         "in_hand": 1})):
        for kind, count in kinds.items():
            assert samples[("fleet_pool_backlog", (("kind", kind), ("queue", queue)))] == count, (queue, kind)
        assert samples[("fleet_pool_backlog_total", (("queue", queue),))] == sum(kinds.values())
    assert samples[("fleet_pool_backlog_total", (("queue", "infer.torchscript.cuda"),))] == 0
    assert samples[("fleet_queue_depth", (("queue", simple),))] == 2  # every priority list, as before
    assert samples[("fleet_model_loads_total", ())] == 4
    assert samples[("fleet_model_load_seconds_total", ())] == pytest.approx(1.5)
    assert samples[("fleet_cache_evicted_age_seconds_total", ())] == 90


async def test_a_pool_scaled_to_zero_accepts_jobs_and_shows_them_as_its_backlog(aiohttp_client, settings, aredis,
                                                                               celery, sredis, admin_key):
    # POOLS lists the pools the API waits for; a pool that scales to zero is not among them (the chart leaves it
    # out), so readiness holds while it has no worker at all, and its jobs wait in its queue for the autoscaler.
    StatsWriter(sredis, KEYS, "t|1").heartbeat([], queues="infer.triton.cpu")
    app = create_app(settings.model_copy(update={"pools": "triton:cpu"}), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app, headers={"X-API-Key": admin_key})
    assert (await client.get("/readyz")).status == 200
    job_id = await enqueue(client, {**PREDICT, "adapter": "simple", "device": "cpu"})  # 202: no live worker needed
    record = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert record["status"] == "queued"
    assert [(name, opts["queue"]) for name, opts in celery.sent] == [("fleet.predict", "infer.simple.cpu")]
    samples = _samples(await (await client.get("/metrics")).text())
    assert samples[("fleet_pool_backlog_total", (("queue", "infer.simple.cpu"),))] == 1
    assert (await client.get("/readyz")).status == 200


async def test_each_app_has_its_own_registry(client, aiohttp_client, settings, aredis, celery, admin_key):
    from producer_api.app import create_app

    other = await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery),
                                 headers={"X-API-Key": admin_key})
    await enqueue(client)
    samples = _samples(await (await other.get("/metrics")).text())
    assert ("fleet_api_jobs_total", (("kind", "predict"), ("status", "queued"))) not in samples


async def test_metrics_can_be_switched_off(aiohttp_client, settings, aredis, celery, admin_key):
    from producer_api.app import create_app

    off = settings.model_copy(update={"enable_metrics": False})
    client = await aiohttp_client(create_app(off, redis=aredis, celery_app=celery),
                                  headers={"X-API-Key": admin_key})
    assert (await client.get("/metrics")).status == 404


async def test_stats_and_metrics_drop_models_whose_stats_expired(client, fleet):
    fleet.sadd(KEYS.stats_models(), "GONE_1h_patchtst", "LATER_1h_patchtst")  # their hashes expired
    body = await (await client.get("/v1/stats")).json()
    assert set(body["models"]) == {MODEL}
    assert fleet.smembers(KEYS.stats_models()) == {MODEL.encode()}  # forgotten, not only hidden
    fleet.sadd(KEYS.stats_models(), "LATER_1h_patchtst")
    assert (await client.get("/metrics")).status == 200
    assert fleet.smembers(KEYS.stats_models()) == {MODEL.encode()}


async def test_a_model_held_but_never_served_is_listed_without_stats(client, fleet):
    StatsWriter(fleet, KEYS, "gamma@host|14").heartbeat([_info("AAPL_1h_sentiment")], queues="infer.simple.cpu")
    body = await (await client.get("/v1/stats")).json()
    assert body["models"]["AAPL_1h_sentiment"]["total_predictions"] == 0
    assert body["models"]["AAPL_1h_sentiment"]["models_loaded"] == 1
