"""The dynamic batcher on its own: results to the right jobs, per-job errors, no idle wait for a lone job."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.errors import InvalidInputError
from shared.schemas import ModelInfo, PredictJob, PredictionResult
from workers.batching import DynamicBatcher

INFO = ModelInfo(model_id="A_1h_patchtst", symbol="A", timeframe="1h", model_type="patchtst", model_path="/x")


def job(value: float) -> PredictJob:
    return PredictJob(symbol="A", timeframe="1h", model_type="patchtst", inputs={"series": [[value]]})


class Recorder:
    """A fake forward: echoes each job's value, fails jobs whose value is negative, remembers batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, jobs):
        self.sizes.append(len(jobs))
        time.sleep(self.delay)  # stands for the forward's duration
        out = []
        for j in jobs:
            v = j.inputs.series[0][0]
            out.append(InvalidInputError(f"bad {v}") if v < 0 else
                       PredictionResult(predictions=[[v]], confidence_score=1, inference_time_ms=1, model_info=INFO))
        return out


def run_concurrently(batcher: DynamicBatcher, values: list[float]) -> list:
    barrier = threading.Barrier(len(values))

    def one(v: float):
        with batcher.arriving():
            barrier.wait()
            try:
                return batcher.predict(job(v), timeout=10)
            except InvalidInputError as exc:
                return exc

    with ThreadPoolExecutor(len(values)) as pool:
        return list(pool.map(one, values))


def test_each_job_gets_its_own_result_and_error() -> None:
    rec = Recorder(delay=0.01)
    batcher = DynamicBatcher(rec, max_batch_size=64, max_delay_s=0.05)
    values = [float(i) if i % 5 else -float(i + 1) for i in range(20)]
    outcomes = run_concurrently(batcher, values)
    batcher.close()
    for v, out in zip(values, outcomes):
        if v < 0:
            assert isinstance(out, InvalidInputError) and str(out) == f"bad {v}"
        else:
            assert out.predictions == [[v]]
    assert sum(rec.sizes) == 20 and max(rec.sizes) > 1  # jobs were really batched together


def test_batches_never_exceed_max_size() -> None:
    rec = Recorder(delay=0.005)
    batcher = DynamicBatcher(rec, max_batch_size=4, max_delay_s=0.05)
    run_concurrently(batcher, [float(i) for i in range(16)])
    batcher.close()
    assert max(rec.sizes) <= 4 and sum(rec.sizes) == 16


def test_lone_job_does_not_wait_for_the_batch_delay() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_batch_size=32, max_delay_s=1.0)
    started = time.perf_counter()
    with batcher.arriving():
        result = batcher.predict(job(3.0), timeout=5)
    elapsed = time.perf_counter() - started
    batcher.close()
    assert result.predictions == [[3.0]]
    assert elapsed < 0.5  # nobody else was on the way, so it ran without waiting the 1 s delay


def test_a_failing_batch_fails_its_jobs_not_the_batcher() -> None:
    calls = []

    def explode(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return Recorder()(jobs)

    batcher = DynamicBatcher(explode, max_batch_size=8, max_delay_s=0.001)
    with pytest.raises(Exception, match="boom"):
        batcher.predict(job(1.0), timeout=5)
    assert batcher.predict(job(2.0), timeout=5).predictions == [[2.0]]
    batcher.close()


def test_torch_threads_never_oversubscribe_whatever_form_the_pool_option_takes() -> None:
    from celery.concurrency import get_implementation

    from shared.settings import FleetSettings
    from workers.process import torch_threads_for
    from workers.signals import processes_sharing_cores

    prefork, threads, solo = (get_implementation(n) for n in ("prefork", "threads", "solo"))
    assert processes_sharing_cores(prefork, 2) == 2  # Celery passes the class, not the name
    assert processes_sharing_cores("prefork", 2) == 2
    assert processes_sharing_cores(threads, 32) == 32
    assert processes_sharing_cores(solo, 1) == 1
    settings = FleetSettings()
    assert torch_threads_for(settings, 2) * 2 <= max(2, __import__("os").cpu_count())
    assert torch_threads_for(settings, 32) == 1


def test_jobs_streaming_in_one_by_one_are_still_batched() -> None:
    # Celery hands messages to task threads one fetch at a time: nobody is "on the way" between two of them,
    # but a job arriving within the delay of the previous one says more are coming.
    rec = Recorder(delay=0.02)
    batcher = DynamicBatcher(rec, max_batch_size=64, max_delay_s=0.05)
    futures = []
    for i in range(20):
        futures.append(batcher.submit(job(float(i))))
        time.sleep(0.001)  # stands for the gap between two deliveries
    outcomes = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [o.predictions for o in outcomes] == [[[float(i)]] for i in range(20)]
    assert len(rec.sizes) < 20 and max(rec.sizes) > 2


class _RowsAdapter:
    """A loaded-model stand-in that records how many rows each forward got."""

    def __init__(self) -> None:
        self.forwards: list[int] = []

    def touch(self, model_id: str) -> bool:
        return True

    def list_loaded_models(self) -> list:
        return []

    def cache_counters(self) -> dict[str, int]:
        return {"hits": 0, "misses": 0, "evictions": 0}

    def predict_many(self, model_id, requests):
        from shared.schemas import ModelInfo, PredictionResult

        self.forwards.append(len(requests))
        info = ModelInfo(model_id=model_id, symbol="AAPL", timeframe="1h", model_type="patchtst", model_path="-")
        return [PredictionResult(predictions=[[float(len(self.forwards))]], confidence_score=0.0,
                                 inference_time_ms=1.0, model_info=info) for _ in requests]


@pytest.mark.parametrize("preferred, forwards", [(None, [20]), (8, [8, 8, 4]), (64, [20])])
def test_a_batch_runs_as_forwards_of_the_preferred_size(preferred, forwards) -> None:
    import fakeredis

    from shared.schemas import PredictJob
    from shared.settings import BatchSettings, FleetSettings
    from workers.runtime import WorkerRuntime

    settings = FleetSettings(_env_file=None, redis_key_prefix="t",
                             batch=BatchSettings(max_batch_size=32, preferred_batch_size=preferred))
    adapter = _RowsAdapter()
    runtime = WorkerRuntime(settings, "w|1", redis=fakeredis.FakeRedis(), adapters={("simple", "cpu"): adapter})
    jobs = [PredictJob(symbol="AAPL", timeframe="1h", model_type="patchtst", inputs={"series": [[1.0]]})
            for _ in range(20)]
    outcomes, _ = runtime.predict_many(jobs)
    assert adapter.forwards == forwards
    # every job still has its own outcome, from the forward it was part of
    assert [o.predictions[0][0] for o in outcomes] == [float(1 + i // (preferred or 32)) for i in range(20)]
