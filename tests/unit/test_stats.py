"""Stats in Redis: atomic writes per job and typed reads, on fakeredis."""

from __future__ import annotations

import fakeredis
import pytest

from shared.keys import Keys
from shared.schemas import ModelInfo
from shared.stats import JobOutcome, StatsReader, StatsWriter, bucket_field


@pytest.fixture()
def redis():
    return fakeredis.FakeRedis()


def info(model_id: str, mb: float) -> ModelInfo:
    return ModelInfo(model_id=model_id, symbol="A", timeframe="1h", model_type="patchtst", model_path="/x",
                     is_loaded=True, memory_usage_mb=mb)


def test_bucket_field_picks_the_first_bound_that_holds() -> None:
    assert bucket_field(0.5) == "h:1"
    assert bucket_field(1.0) == "h:1"
    assert bucket_field(3.0) == "h:5"
    assert bucket_field(99999) == "h:+Inf"


def test_counters_per_model_worker_and_fleet(redis) -> None:
    keys = Keys("t")
    w1, w2 = StatsWriter(redis, keys, "w1", started_at=100.0), StatsWriter(redis, keys, "w2", started_at=100.0)
    w1.record([JobOutcome("A_1h_patchtst", True, 4.0), JobOutcome("A_1h_patchtst", False, 0.0)],
              cache={"hits": 3, "misses": 1, "evictions": 2, "evictions_lru": 2})
    w2.record([JobOutcome("B_1h_patchtst", True, 8.0)])
    w1.heartbeat([info("A_1h_patchtst", 2.0)], now=200.0, queues="infer.simple.cpu")
    w2.heartbeat([info("B_1h_patchtst", 3.0), info("A_1h_patchtst", 2.0)], now=200.0)
    reader = StatsReader(redis, keys)
    model = reader.model("A_1h_patchtst")
    assert (model.total_predictions, model.successful_predictions, model.failed_predictions) == (2, 1, 1)
    assert model.success_rate == 0.5 and model.average_inference_time_ms == 4.0
    worker = stats_w1 = reader.worker("w1")
    assert (stats_w1.cache_hits, stats_w1.cache_misses, stats_w1.cache_evictions) == (3, 1, 2)
    assert worker.cache_hit_ratio == 0.75 and worker.cache_evictions_by_reason == {"lru": 2}
    assert worker.latency_histogram_ms["5"] == 1 and worker.latency_histogram_ms["+Inf"] == 1


def test_fleet_sums_live_workers_only(redis) -> None:
    import time

    keys = Keys("t")
    now = time.time()
    live, dead = StatsWriter(redis, keys, "live"), StatsWriter(redis, keys, "dead")
    live.heartbeat([info("A_1h_patchtst", 2.0)], now=now)
    dead.heartbeat([info("B_1h_patchtst", 5.0)], now=now - 3600)
    live.record([JobOutcome("A_1h_patchtst", True, 1.0)])
    dead.record([JobOutcome("B_1h_patchtst", True, 1.0)])
    reader = StatsReader(redis, keys)
    assert reader.live_workers() == ["live"]
    fleet = reader.fleet()
    assert fleet.total_predictions == 2  # counters keep the history of every worker
    assert fleet.models_loaded == 1 and fleet.total_memory_mb == 2.0  # residency counts live workers only
    assert reader.model("A_1h_patchtst").models_loaded == 1
    live.retire()
    assert reader.live_workers() == []
