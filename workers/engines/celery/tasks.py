"""The public Celery tasks: thin wrappers that hand the delivery to this process's executor.

Each takes one keyword argument ``job`` (the JSON form of its schema). The executor stores the result itself,
in Celery's own format, in one MULTI with the job's record and stats (hence ``ignore_result``); the return value
is a summary for task events and Flower. A failure is raised as its typed :class:`shared.errors.FleetError` so
that Celery reports it (events, Flower); the stored result already says ``{exc_type, exc_message}`` in JSON.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from shared import tasks as names
from shared.celery_app import app
from shared.errors import FleetError
from workers import process
from workers.executor.delivery import Delivery
from workers.executor.policies import Skip


def run(task: Task, job: Any) -> dict[str, Any]:
    queue = (task.request.delivery_info or {}).get("routing_key")
    (outcome,) = process.current().executor.run([Delivery(task.request.id, task.name, job, queue=queue)])
    if isinstance(outcome, FleetError):
        raise outcome
    status = "skipped" if isinstance(outcome, Skip) else "succeeded"
    return {"job_id": task.request.id, "status": status}


# NOTE: ``throws`` marks typed errors as expected outcomes: Celery logs them in one line, not as a traceback.
# The Request class turns a hard time limit into the job's JobTimeoutError.
_options = {"bind": True, "ignore_result": True, "throws": (FleetError,),
            "Request": "workers.engines.celery.request:FleetRequest"}


@app.task(name=names.LOAD, **_options)
def load(self: Task, job: Any = None) -> dict[str, Any]:
    return run(self, job)


@app.task(name=names.PREDICT, **_options)
def predict(self: Task, job: Any = None) -> dict[str, Any]:
    return run(self, job)


@app.task(name=names.BATCH_PREDICT, **_options)
def batch_predict(self: Task, job: Any = None) -> dict[str, Any]:
    return run(self, job)


@app.task(name=names.UNLOAD, **_options)
def unload(self: Task, job: Any = None) -> dict[str, Any]:
    return run(self, job)
