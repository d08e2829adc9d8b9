"""Response bodies of the API (and the request forms that only the docs need), as pydantic models.

Routes serialise through these so that the OpenAPI document (generated from them) and the wire agree.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from producer_api.jobdoc import JobDocument
from producer_api.oip import ModelSignature
from shared.schemas import BatchPredictJob, JobErrorBody, PredictJob, ServingStats


class Accepted(BaseModel):
    """A job was enqueued; poll ``status_url`` (or open its ``/events`` websocket) for its document."""

    job_id: str
    status_url: str

    @classmethod
    def for_job(cls, job_id: str) -> "Accepted":
        return cls(job_id=job_id, status_url=f"/v1/jobs/{job_id}")


def json_document(doc: BaseModel, status: int = 200) -> web.Response:
    """``doc`` as a JSON response, serialised by pydantic's core in one pass (no intermediate dicts)."""
    return web.Response(body=doc.model_dump_json().encode(), status=status, content_type="application/json")


class CancelRequested(JobDocument):
    """What ``DELETE /v1/jobs/{id}`` answers (202) for a running job: its document now, and the request to stop.

    Workers honour the request between batch items (a running single prediction finishes); the job's final
    status is whatever its worker records, ``cancelled`` or not.
    """

    cancel_requested: bool = True


class ErrorResponse(BaseModel):
    """The one error shape of every non-2xx answer."""

    error: JobErrorBody


class StoredModel(BaseModel):
    """A model in the store, with the live workers that hold it now."""

    model_id: str
    symbol: str
    timeframe: str
    model_type: str
    versions: list[str]
    latest: str
    meta: dict[str, Any] = Field(default_factory=dict)
    loaded_on: list[str] = Field(default_factory=list)
    """Ids (``<celery hostname>|<pid>``) of live worker processes holding the model."""
    signature: ModelSignature | None = None
    """The newest version's inputs and outputs as Open Inference Protocol tensors (``GET /v2/models/{name}``)."""


class ModelList(BaseModel):
    models: list[StoredModel]


class StatsResponse(BaseModel):
    """Serving stats of the fleet, of each live worker process and of each model."""

    fleet: ServingStats
    workers: dict[str, ServingStats]
    models: dict[str, ServingStats]


class Health(BaseModel):
    """Liveness or readiness; ``workers`` counts live workers per required queue."""

    status: str
    workers: dict[str, int] | None = None


class BatchPredictRequest(BatchPredictJob):
    """Many predictions in one job (docs form: each item is a predict body, validated one by one)."""

    requests: list[PredictJob] = Field(min_length=1)  # type: ignore[assignment]
