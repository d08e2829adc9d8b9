"""The Open Inference Protocol (KServe v2) over REST: health, server and model metadata, model readiness, infer.

The translation lives in :mod:`producer_api.oip`; these handlers only decode, delegate and encode. An infer is a
``/v1/predict`` job: validated by :func:`~producer_api.enqueue.parse_job`, recorded and sent under the caller's key
by :func:`~producer_api.enqueue.submit`, and awaited on the shared job watch for at most :data:`INFER_WAIT_S`; so
it takes the same queues, batching, stats, scopes and rate limits. Errors answer in the protocol's shape (the
app's error middleware writes it for every ``/v2`` path: :func:`producer_api.errors.oip_error_body`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from cachetools import TTLCache
from pydantic import BaseModel

import shared
from producer_api import oip
from producer_api.body import MAX_WAIT_S, read_raw
from producer_api.context import STORE_CHECK_TTL_S, ApiContext, ctx
from producer_api.enqueue import parse_job, submit
from producer_api.fleetview import live_workers
from producer_api.jobdoc import JobDocument
from producer_api.routes import health
from producer_api.security.principal import Principal, principal_of
from producer_api.watch import JobWatch
from shared.errors import FleetError
from shared.schemas import ModelKey

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: Longest an infer waits for its job, in seconds (as ``?wait`` on ``/v1/predict``); then a 504 naming the job.
INFER_WAIT_S = MAX_WAIT_S
#: (store root, model id, version or None) -> :class:`producer_api.oip.StoredVersion`: an infer reads the disk
#: once per model per STORE_CHECK_TTL_S, as a predict does.
_STORED: TTLCache = TTLCache(maxsize=4096, ttl=STORE_CHECK_TTL_S)


def _json(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), content_type="application/json")


async def _stored(c: ApiContext, name: str, version: str | None) -> tuple[ModelKey, oip.StoredVersion]:
    """The model a path names, and that version of it in the store (404 when either is unknown)."""
    key = oip.model_key(name)
    cached = (str(c.settings.model_store_dir), key.model_id, version)
    found = _STORED.get(cached)
    if found is None:
        # NOTE: reading the store is blocking file IO; keep it off the event loop.
        found = await asyncio.get_running_loop().run_in_executor(
            None, oip.read_model, c.settings.model_store_dir, key, version)
        _STORED[cached] = found
    return key, found


async def _holders(c: ApiContext, model_id: str, version: str | None) -> list[str]:
    """Live worker processes holding the model now (that version of it, when one is named)."""
    workers = await live_workers(c.redis, c.keys)
    pipe = c.redis.pipeline(transaction=False)
    for worker in workers:
        pipe.hget(c.keys.worker_models(worker), model_id)
    held = []
    for worker, raw in zip(workers, await pipe.execute()):
        if raw is None:
            continue
        try:
            found = orjson.loads(raw).get("version")  # the ModelInfo the worker heart-beats
        except (orjson.JSONDecodeError, AttributeError):
            found = None
        if version is None or str(found) == version:
            held.append(worker)
    return held


@routes.get("/v2/health/live")
async def server_live(request: web.Request) -> web.Response:
    """The process serves requests (nothing else is checked, as for ``/healthz``)."""
    return web.Response()


@routes.get("/v2/health/ready")
async def server_ready(request: web.Request) -> web.Response:
    """The check of ``/readyz`` (Redis answers, every configured pool has a live worker); 503 otherwise."""
    await health.readyz(request)
    return web.Response()


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return _json(oip.ServerMetadata(version=shared.__version__))


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    key, stored = await _stored(ctx(request), request.match_info["name"], request.match_info.get("version"))
    return _json(oip.ModelMetadata(name=key.model_id, versions=list(stored.versions),
                                   **stored.signature.model_dump()))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    """200 when a live worker process holds the model loaded; 503 when none does (404 for a model not stored)."""
    c, version = ctx(request), request.match_info.get("version")
    key, _ = await _stored(c, request.match_info["name"], version)
    if not await _holders(c, key.model_id, version):
        which = f"{key.model_id} version {version}" if version else key.model_id
        raise oip.ModelNotReadyError(f"model {which} is not loaded by any live worker; load it with POST "
                                     f"/v1/models/load (or send an infer: the worker that takes it loads it)",
                                     field="name")
    return web.Response()


async def _run(c: ApiContext, job: Any, principal: Principal) -> JobDocument:
    """Enqueue a validated predict job and await its end (at most :data:`INFER_WAIT_S`)."""
    job_id = str(uuid.uuid4())
    # Subscribed (and confirmed) before the job exists: its end cannot slip by unseen.
    async with JobWatch(c.channels, c.records, job_id, principal) as watch:
        _, enqueued_at = await submit(c, "predict", job, principal, job_id)
        doc, _ = await watch.until_final(INFER_WAIT_S, first=JobDocument(job_id=job_id, kind="predict",
                                                                          status="queued"))
    if not doc.final:
        raise oip.InferTimeoutError(f"job {job_id} did not end within {INFER_WAIT_S:g} s (it is {doc.status}); it "
                                    f"goes on: GET /v1/jobs/{job_id} reads it", field="job_id")
    c.metrics.job_latency.labels(kind="predict").observe(max(0.0, time.time() - enqueued_at))
    return doc


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    c, principal, version = ctx(request), principal_of(request), request.match_info.get("version")
    key, stored = await _stored(c, request.match_info["name"], version)
    req, binary = oip.read_request(await read_raw(request), request.headers.get(oip.HEADER_LENGTH))
    wanted = oip.requested_outputs(req, stored.signature)  # before the job: a bad output name must not run one
    try:
        job = parse_job(c, "predict", oip.job_body(key, stored.signature, req, binary, version))
    except FleetError as exc:
        raise oip.renamed(exc) from None
    doc = await _run(c, job, principal)
    result = oip.job_result(doc)
    parameters: dict[str, oip.Parameter] = {"job_id": doc.job_id, "inference_time_ms": result.inference_time_ms}
    if doc.worker:
        parameters["worker"] = doc.worker
    body, content_type, headers = oip.encode_response(key.model_id, result.model_info.version, req.id, parameters,
                                                      oip.result_tensors(key, result), wanted)
    return web.Response(body=body, content_type=content_type, headers=headers)
