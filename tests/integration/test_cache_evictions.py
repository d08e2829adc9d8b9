"""Cache evictions in a real worker process, read back from the counters in Redis."""

from __future__ import annotations

import time

from shared import tasks
from shared.store_layout import META_FILE, model_dir, read_json
from shared.schemas import ModelKey

TIMEOUT = 60


def load(producer, symbol: str, model_type: str) -> dict:
    job = {"symbol": symbol, "timeframe": "1h", "model_type": model_type}
    return producer.send_task(tasks.LOAD, kwargs={"job": job}).get(timeout=TIMEOUT)


def worker_stats(stats, worker):
    (worker_id,) = worker.ids
    return stats.worker(worker_id), stats.worker_models(worker_id)


def test_lru_evicts_least_recently_used(start_worker, producer, stats) -> None:
    worker = start_worker(concurrency=1, SIMPLE_MAX_MODELS_IN_MEMORY="2")
    load(producer, "AAPL", "patchtst")
    load(producer, "MSFT", "patchtst")
    load(producer, "AAPL", "patchtst")  # a use: MSFT is now the least recently used
    load(producer, "AAPL", "patchtsmixer")
    counters, models = worker_stats(stats, worker)
    assert counters.cache_evictions_by_reason.get("lru") == 1
    assert sorted(m.model_id for m in models) == ["AAPL_1h_patchtsmixer", "AAPL_1h_patchtst"]
    assert counters.cache_hits >= 1 and counters.cache_misses >= 3
    assert counters.cache_loads >= 3 and counters.cache_load_ms_total >= 0


def test_idle_ttl_evicts(start_worker, producer, stats) -> None:
    worker = start_worker(concurrency=1, SIMPLE_MODEL_TIMEOUT_SECONDS="1")
    load(producer, "AAPL", "patchtst")
    time.sleep(1.5)  # let the model go idle past its TTL (the condition under test is elapsed time itself)
    load(producer, "MSFT", "patchtst")  # any cache access expires idle entries
    counters, models = worker_stats(stats, worker)
    assert counters.cache_evictions_by_reason.get("ttl") == 1
    assert [m.model_id for m in models] == ["MSFT_1h_patchtst"]


def test_memory_budget_evicts(start_worker, producer, stats, fleet_settings) -> None:
    meta = read_json(model_dir(fleet_settings.model_store_dir,
                               ModelKey(symbol="AAPL", timeframe="1h", model_type="patchtst")) / META_FILE)
    one_model_mb = meta["n_params"] * 4 / 2**20
    # room for one and a half models: the second load must push the first out on memory, not on count
    worker = start_worker(concurrency=1, SIMPLE_CACHE_SIZE_MB=str(one_model_mb * 1.5))
    load(producer, "AAPL", "patchtst")
    load(producer, "MSFT", "patchtst")
    counters, models = worker_stats(stats, worker)
    assert counters.cache_evictions_by_reason.get("memory") == 1
    assert [m.model_id for m in models] == ["MSFT_1h_patchtst"]
    assert counters.total_memory_mb <= one_model_mb * 1.5 + 1e-6
