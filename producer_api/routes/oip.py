"""The Open Inference Protocol (KServe v2) over REST: health, server and model metadata, model readiness, infer.

The wire forms live in :mod:`producer_api.oip` and the operations in :mod:`producer_api.service.inference`
(shared with the gRPC ``GRPCInferenceService``); these handlers only decode, delegate and encode. Errors answer
in the protocol's shape (the app's error middleware writes it for every ``/v2`` path:
:func:`producer_api.errors.oip_error_body`).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

import shared
from producer_api import oip
from producer_api.body import read_raw
from producer_api.context import ctx
from producer_api.security.principal import principal_of
from producer_api.service import inference
from producer_api.service.health import readiness

routes = web.RouteTableDef()


def _json(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), content_type="application/json")


@routes.get("/v2/health/live")
async def server_live(request: web.Request) -> web.Response:
    """The process serves requests (nothing else is checked, as for ``/healthz``)."""
    return web.Response()


@routes.get("/v2/health/ready")
async def server_ready(request: web.Request) -> web.Response:
    """The check of ``/readyz`` (Redis answers, every configured pool has a live worker); 503 otherwise."""
    await readiness(ctx(request))
    return web.Response()


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return _json(oip.ServerMetadata(version=shared.__version__))


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    key, found = await inference.stored(ctx(request), request.match_info["name"], request.match_info.get("version"))
    return _json(oip.ModelMetadata(name=key.model_id, versions=list(found.versions), **found.signature.model_dump()))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    """200 when a live worker process holds the model loaded; 503 when none does (404 for a model not stored)."""
    version = request.match_info.get("version")
    key, ready = await inference.model_ready(ctx(request), request.match_info["name"], version)
    if not ready:
        which = f"{key.model_id} version {version}" if version else key.model_id
        raise oip.ModelNotReadyError(f"model {which} is not loaded by any live worker; load it with POST "
                                     f"/v1/models/load (or send an infer: the worker that takes it loads it)",
                                     field="name")
    return web.Response()


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    c, version = ctx(request), request.match_info.get("version")
    key, found = await inference.stored(c, request.match_info["name"], version)
    req, binary = oip.read_request(await read_raw(request), request.headers.get(oip.HEADER_LENGTH))
    outcome = await inference.infer(c, principal_of(request), key, found, req, binary, version)
    body, content_type, headers = oip.encode_response(key.model_id, outcome.result.model_info.version, req.id,
                                                      outcome.parameters(), outcome.tensors(), outcome.wanted)
    return web.Response(body=body, content_type=content_type, headers=headers)
