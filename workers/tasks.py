"""The public Celery tasks: thin wrappers that validate the payload, delegate to the runtime, encode the result.

Each takes one keyword argument ``job`` (the JSON form of its schema) and returns the JSON form of its result.
A failure raises a :class:`shared.errors.FleetError` subclass: Celery stores it as ``{exc_type, exc_message}``
in JSON (never pickled), and the job record gets ``{type, message}``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from celery import Task
from celery.signals import task_postrun
from pydantic import BaseModel

from shared import tasks as names
from shared.celery_app import app
from shared.errors import FleetError, JobCancelledError, as_fleet_error
from shared.schemas import BatchPredictJob, LoadJob, PredictJob, UnloadJob
from workers.payloads import parse_job
from workers.process import get_runtime
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)
Handler = Callable[[Task, WorkerRuntime, Any], tuple[BaseModel, float, float]]

#: Outcome of each job of this process, written to its record after Celery stored the result (task_postrun),
#: so that a client woken by the final event always finds the result in the backend.
_finished: dict[str, dict[str, Any]] = {}
_finished_lock = threading.Lock()


def run_job(task: Task, schema: type[BaseModel], raw: Any, handler: Handler) -> dict[str, Any]:
    runtime = get_runtime()
    job_id = task.request.id
    outcome: dict[str, Any] = {"ok": False, "load_ms": 0.0, "inference_ms": 0.0, "error": None}
    try:
        payload = parse_job(schema, raw)
        if runtime.jobs.is_cancelled(job_id):
            raise JobCancelledError(f"job {job_id} was cancelled before it started")
        total = len(payload.requests) if isinstance(payload, BatchPredictJob) else None
        runtime.jobs.running(job_id, runtime.worker_id, time.time(), total=total)
        result, load_ms, inference_ms = handler(task, runtime, payload)
        outcome.update(ok=True, load_ms=load_ms, inference_ms=inference_ms)
        return result.model_dump(mode="json")
    except Exception as exc:
        err = as_fleet_error(exc)
        if not isinstance(exc, FleetError):
            log.exception("job %s failed unexpectedly", job_id)
        outcome["error"] = err.to_dict()
        outcome["status"] = "cancelled" if isinstance(err, JobCancelledError) else "failed"
        raise err from None
    finally:
        with _finished_lock:
            _finished[job_id] = outcome


@task_postrun.connect
def _record_finished(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    with _finished_lock:
        outcome = _finished.pop(task_id or "", None)
    if outcome is None or task is None or not task.name.startswith("fleet."):
        return
    try:
        get_runtime().jobs.finished(task_id, outcome["ok"], load_ms=outcome["load_ms"],
                                    inference_ms=outcome["inference_ms"], error=outcome["error"],
                                    status=outcome.get("status"))
    except Exception:  # the result is stored already; a lost record update must not fail the job
        log.exception("could not write the final record of job %s", task_id)


def _load(task: Task, runtime: WorkerRuntime, job: LoadJob) -> tuple[BaseModel, float, float]:
    info, load_ms = runtime.load(job)
    return info, load_ms, 0.0



def _batch_predict(task: Task, runtime: WorkerRuntime, job: BatchPredictJob) -> tuple[BaseModel, float, float]:
    job_id = task.request.id

    def progress(done: int, total: int) -> None:
        task.update_state(state="PROGRESS", meta={"done": done, "total": total})
        runtime.jobs.progress(job_id, done, total)

    return runtime.batch_predict(job, progress=progress, cancelled=lambda: runtime.jobs.is_cancelled(job_id))


def _unload(task: Task, runtime: WorkerRuntime, job: UnloadJob) -> tuple[BaseModel, float, float]:
    return runtime.unload(job), 0.0, 0.0


# NOTE: ``throws`` marks typed errors as expected outcomes: Celery logs them in one line, not as a traceback.
_options = {"bind": True, "throws": (FleetError,)}


@app.task(name=names.LOAD, **_options)
def load(self: Task, job: Any = None) -> dict[str, Any]:
    return run_job(self, LoadJob, job, _load)


def _serve_prediction(task: Task, raw: Any) -> dict[str, Any]:
    runtime = get_runtime()
    job_id = task.request.id
    try:
        job = parse_job(PredictJob, raw)
    except FleetError as err:
        runtime.reject(job_id, err)
        raise
    item = (job_id, job)
    outcome = runtime.batcher.submit(item).result() if runtime.batcher else runtime.serve([item])[0]
    if isinstance(outcome, FleetError):
        raise outcome  # already stored; raising makes Celery report the failure (events, Flower)
    return {"job_id": job_id, "status": "succeeded"}


# NOTE: the predict path stores its own result (workers.results: result, record and stats of a whole batch in one
# Redis round trip), hence ignore_result; the return value is a summary for events and Flower.
@app.task(name=names.PREDICT, ignore_result=True, **_options)
def predict(self: Task, job: Any = None) -> dict[str, Any]:
    batcher = get_runtime().batcher
    if batcher is None:
        return _serve_prediction(self, job)
    with batcher.arriving():  # lets the batcher know one more job is on its way
        return _serve_prediction(self, job)


@app.task(name=names.BATCH_PREDICT, **_options)
def batch_predict(self: Task, job: Any = None) -> dict[str, Any]:
    return run_job(self, BatchPredictJob, job, _batch_predict)


@app.task(name=names.UNLOAD, **_options)
def unload(self: Task, job: Any = None) -> dict[str, Any]:
    return run_job(self, UnloadJob, job, _unload)
