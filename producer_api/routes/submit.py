"""Job submission: load, unload, predict and batch predict. Each answers 202 with the job id, or, with
``?wait=S``, 200 with the finished job document when the job ends within S seconds."""

from __future__ import annotations

from aiohttp import web

from producer_api.body import read_body, wait_param
from producer_api.context import ctx
from producer_api.enqueue import ROW_FIELDS, parse_job
from producer_api.responses import Accepted, json_document
from producer_api.security.principal import principal_of
from producer_api.service import jobs

routes = web.RouteTableDef()


async def enqueue(request: web.Request, kind: str) -> web.Response:
    """Validate, enqueue and optionally wait for one ``kind`` job."""
    c = ctx(request)
    wait = wait_param(request)  # before enqueueing: a bad ?wait must not leave a job behind
    job = parse_job(c, kind, await read_body(request, row_field=ROW_FIELDS.get(kind)))
    job_id, doc = await jobs.enqueue(c, kind, job, principal_of(request), wait)
    if doc is not None:
        return json_document(doc)
    return web.json_response(Accepted.for_job(job_id).model_dump(), status=202)


@routes.post("/v1/models/load")
async def load_model(request: web.Request) -> web.Response:
    return await enqueue(request, "load")


@routes.post("/v1/models/unload")
async def unload_model(request: web.Request) -> web.Response:
    return await enqueue(request, "unload")


@routes.post("/v1/predict")
async def predict(request: web.Request) -> web.Response:
    return await enqueue(request, "predict")


@routes.post("/v1/predict/batch")
async def predict_batch(request: web.Request) -> web.Response:
    return await enqueue(request, "batch_predict")
