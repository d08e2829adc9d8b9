"""Stats in Redis: atomic writes per job and typed reads, on fakeredis; no stats for models the store lacks,
and model stats that expire."""

from __future__ import annotations

import fakeredis
import pytest

from shared.errors import ModelNotFoundError, PredictionError
from shared.keys import MODEL_STATS_TTL_S, Keys
from shared.schemas import ModelInfo, UnloadResult
from shared.stats import JobOutcome, StatsReader, StatsWriter, bucket_field, forget_models, stats_from_hash


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


def test_a_prediction_of_a_model_not_in_the_store_counts_for_the_fleet_not_the_model(redis) -> None:
    keys = Keys("t")
    writer = StatsWriter(redis, keys, "w1")
    missing = ModelNotFoundError("model MADE_1h_patchtst is not in the model store")
    outcomes = [JobOutcome.of("MADE_1h_patchtst", missing), JobOutcome.of("A_1h_patchtst", object(), 5.0),
                JobOutcome.of("A_1h_patchtst", PredictionError("boom"), 9.0)]
    assert outcomes[0] == JobOutcome(None, False, 0.0) and outcomes[2] == JobOutcome("A_1h_patchtst", False, 0.0)
    writer.record(outcomes)
    assert not redis.exists(keys.model_stats("MADE_1h_patchtst"))
    assert redis.smembers(keys.stats_models()) == {b"A_1h_patchtst"}
    reader = StatsReader(redis, keys)
    assert reader.model("A_1h_patchtst").total_predictions == 2
    fleet = stats_from_hash(redis.hgetall(keys.fleet_stats()))
    assert (fleet.total_predictions, fleet.failed_predictions) == (3, 2)
    assert reader.worker("w1").total_predictions == 3


def test_model_stats_expire_after_their_last_write_and_readers_forget_them(redis) -> None:
    keys = Keys("t")
    writer = StatsWriter(redis, keys, "w1")
    writer.record([JobOutcome("A_1h_patchtst", True, 1.0), JobOutcome("B_1h_patchtst", True, 1.0)])
    for key in (keys.model_stats("A_1h_patchtst"), keys.model_stats("B_1h_patchtst"), keys.stats_models()):
        assert MODEL_STATS_TTL_S - 5 < redis.ttl(key) <= MODEL_STATS_TTL_S
    redis.expire(keys.model_stats("B_1h_patchtst"), 1000)
    writer.record([JobOutcome("B_1h_patchtst", True, 1.0)])  # each write refreshes the TTL
    assert redis.ttl(keys.model_stats("B_1h_patchtst")) > MODEL_STATS_TTL_S - 5
    assert redis.ttl(keys.worker_stats("w1")) == -1 and redis.ttl(keys.fleet_stats()) == -1  # these stay
    redis.delete(keys.model_stats("B_1h_patchtst"))  # as its TTL would
    reader = StatsReader(redis, keys)
    assert set(reader.models()) == {"A_1h_patchtst"}
    assert redis.smembers(keys.stats_models()) == {b"A_1h_patchtst"}


def test_forgetting_never_drops_a_model_whose_stats_came_back(redis) -> None:
    keys = Keys("t")
    redis.sadd(keys.stats_models(), "A_1h_patchtst", "B_1h_patchtst")
    StatsWriter(redis, keys, "w1").record([JobOutcome("A_1h_patchtst", True, 1.0)])
    forget_models(redis, keys, ["A_1h_patchtst", "B_1h_patchtst"])  # A was written after its caller looked
    assert redis.smembers(keys.stats_models()) == {b"A_1h_patchtst"}


def test_the_outcome_writer_keeps_made_up_models_out_of_the_stats(redis) -> None:
    from shared.celery_app import app
    from shared.jobs import JobRecorder
    from workers.executor.outcomes import CeleryResultEncoder, FinishedJob, OutcomeWriter

    keys = Keys("t")
    writer = OutcomeWriter(redis, JobRecorder(redis, keys, 60), StatsWriter(redis, keys, "w1"),
                           CeleryResultEncoder(app.backend), 60)
    result = UnloadResult(model_id="A_1h_patchtst", unloaded=True)  # any result: only its kind matters here
    writer.finish([FinishedJob("j1", "MADE_1h_patchtst", ModelNotFoundError("not in the store")),
                   FinishedJob("j2", "A_1h_patchtst", result, inference_ms=2.0)])
    assert redis.smembers(keys.stats_models()) == {b"A_1h_patchtst"}
    assert stats_from_hash(redis.hgetall(keys.fleet_stats())).total_predictions == 2
    writer.progress("j3", 1, 2, [JobOutcome.of("MADE_1h_patchtst", ModelNotFoundError("gone"))])
    assert not redis.exists(keys.model_stats("MADE_1h_patchtst"))


def test_cache_loads_load_time_and_ages_at_eviction_are_read_back(redis) -> None:
    keys = Keys("t")
    writer = StatsWriter(redis, keys, "w1", started_at=100.0)
    writer.record([], cache={"loads": 2, "load_ms": 7, "evicted_age_s": 40, "evictions_lru": 1, "evictions": 1})
    writer.record([], cache={"loads": 1, "load_ms": 3, "evicted_age_s": 0})
    for raw in (redis.hgetall(keys.worker_stats("w1")), redis.hgetall(keys.fleet_stats())):
        stats = stats_from_hash(raw)
        assert (stats.cache_loads, stats.cache_load_ms_total, stats.cache_evicted_age_seconds_total) == (3, 10, 40)
        assert stats.cache_evictions_by_reason == {"lru": 1}  # the new fields are no eviction reason
    assert stats_from_hash({}).cache_loads == 0
