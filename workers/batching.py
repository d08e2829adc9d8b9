"""Dynamic batching of predict jobs inside one worker process (Triton-style, per model).

Mechanism (chosen by measurement, see README "Batching"): the worker runs Celery's thread pool; each task
thread validates its job, submits it here and blocks on its own future. One batching thread takes the first
waiting job and gathers more for up to ``max_batch_delay_ms`` — but only while more are likely: some task thread
is on its way (has taken a message and not yet submitted), or jobs are streaming in (the first job came within
the delay of the one before it; Celery hands messages over one fetch at a time). A lone request, with nobody on
the way and nothing before it, runs at once and pays no delay. The batch goes through
:meth:`WorkerRuntime.predict_many`, one forward per model (and ``n_steps``) of up to ``max_batch_size`` rows,
stats written in one Redis round trip; each future gets its own result or its own typed error.

Each task returns only after its own future resolved, so Celery stores that job's result and only then acks its
message (``acks_late``): a worker killed mid-batch leaves every unacknowledged message to be delivered again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from shared.errors import FleetError, InternalError
from shared.schemas import PredictJob, PredictionResult

log = logging.getLogger(__name__)
Outcome = PredictionResult | FleetError
RunBatch = Callable[[Sequence[PredictJob]], list[Outcome]]


class DynamicBatcher:
    """Gathers predict jobs from task threads into batched forwards on one thread."""

    def __init__(self, run: RunBatch, max_batch_size: int, max_delay_s: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._queue: queue.SimpleQueue[tuple[Any, Future, float]] = queue.SimpleQueue()
        self._last_submit = float("-inf")
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self.batches = 0
        self.jobs = 0
        self._thread = threading.Thread(target=self._loop, name="fleet-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a task's whole run: while a thread is inside and has not submitted, the batch may wait for it."""
        with self._arriving_lock:
            self._arriving += 1
        self._local.submitted = False
        try:
            yield
        finally:
            if not self._local.submitted:
                with self._arriving_lock:
                    self._arriving -= 1

    def submit(self, job: PredictJob) -> "Future[Outcome]":
        future: Future[Outcome] = Future()
        now = time.monotonic()
        gap, self._last_submit = now - self._last_submit, now
        self._queue.put((job, future, gap))
        if getattr(self._local, "submitted", True) is False:
            self._local.submitted = True
            with self._arriving_lock:
                self._arriving -= 1
        return future

    def predict(self, job: PredictJob, timeout: float | None = None) -> PredictionResult:
        """Submit and wait; raises the job's own typed error."""
        outcome = self.submit(job).result(timeout)
        if isinstance(outcome, FleetError):
            raise outcome
        return outcome

    def _gather(self, first: tuple[Any, Future, float]) -> list[tuple[Any, Future, float]]:
        batch = [first]
        deadline = time.monotonic() + self.max_delay_s
        streaming = first[2] < self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._arriving <= 0 and not streaming):
                break  # nobody else is on the way and nothing is streaming in: waiting cannot grow the batch
            try:
                batch.append(self._queue.get(timeout=min(remaining, 0.0005)))
            except queue.Empty:
                continue
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = self._gather(first)
            try:
                outcomes = self._run([job for job, _, _ in batch])
            except Exception as exc:  # a failing batch fails its jobs, never the batching thread
                log.exception("batch of %d failed", len(batch))
                outcomes = [InternalError(f"batch failed: {type(exc).__name__}: {exc}")] * len(batch)
            self.batches += 1
            self.jobs += len(batch)
            for (_, future, _), outcome in zip(batch, outcomes):
                future.set_result(outcome)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
