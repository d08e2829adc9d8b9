"""The OpenAPI 3.1 document, generated from the pydantic models the routes validate and answer with.

Schemas come from :func:`pydantic.json_schema.models_json_schema` with refs pointing into
``components/schemas``; only the route table below (paths, parameters, which model goes where) is written by
hand, and the tests validate the result with ``openapi-spec-validator``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

import shared
from producer_api.body import MAX_WAIT_S
from producer_api.jobdoc import JobDocument
from producer_api.records import JOB_ID_PATTERN
from producer_api.responses import (Accepted, BatchPredictRequest, CancelRequested, ErrorResponse, Health, ModelList,
                                    StatsResponse)
from producer_api.deadletters import DeadLetterList, RequeueRequest
from producer_api.oip import HEADER_LENGTH, InferenceRequest, InferenceResponse, ModelMetadata, OipError, ServerMetadata
from producer_api.security.middleware import PUBLIC, ROUTE_SCOPES
from producer_api.security.schemas import KeyCreated, KeyList, KeyRequest, KeyRevoked
from shared.schemas import LoadJob, PredictJob, UnloadJob

REF = "#/components/schemas/{model}"
_JOB_ID = {"name": "id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": f"^{JOB_ID_PATTERN.pattern}$"},
           "description": "Job id (the API's are UUIDs; a Celery producer may choose others of this form)"}
_WAIT = {"name": "wait", "in": "query", "required": False,
         "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S},
         "description": "Hold the request up to this many seconds for the job to end (200 with the document); "
                        "202 with the job id when it does not."}
_KEY_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Key name"}
_DL_QUEUE = {"name": "queue", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "One pool queue (infer.<adapter>.<device>); every pool's by default"}
_DL_LIMIT = {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
_MODEL_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "The model's id: <SYMBOL>_<timeframe>_<model_type> (e.g. AAPL_1h_patchtst)"}
_MODEL_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": "A version in the model store (1, 2, ...)"}
_HEADER_LENGTH = {"name": HEADER_LENGTH, "in": "header", "required": False,
                  "schema": {"type": "integer", "minimum": 0},
                  "description": "Binary tensor extension: the JSON header's length in bytes; the inputs' raw bytes "
                                 "follow it (parameters.binary_data_size each). Binary outputs come back the same way."}
_MSGPACK = ("application/msgpack",)
#: The routes of the Open Inference Protocol: their bodies and errors are the protocol's.
_OIP_PREFIX = "/v2"
#: How a key is sent: either header works on every route that needs one.
_SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer", "description": "The same API key as a Bearer token"},
}

# (method, path, summary, request model, {status: response model or media type}, parameters)
_ROUTES: list[tuple[str, str, str, Any, dict[int, Any], list[dict[str, Any]]]] = [
    ("post", "/v1/models/load", "Load a model into a pool's workers", LoadJob, {202: Accepted}, [_WAIT]),
    ("post", "/v1/models/unload", "Unload a model from a pool's worker", UnloadJob, {202: Accepted}, [_WAIT]),
    ("post", "/v1/predict", "Enqueue one prediction", PredictJob, {200: JobDocument, 202: Accepted}, [_WAIT]),
    ("post", "/v1/predict/batch", "Enqueue many predictions as one job", BatchPredictRequest,
     {200: JobDocument, 202: Accepted}, [_WAIT]),
    ("get", "/v1/jobs/{id}", "A job's document", None, {200: JobDocument}, [_JOB_ID, _WAIT]),
    ("delete", "/v1/jobs/{id}", "Cancel a job: a queued one at once (200, cancelled), a running one is asked to "
     "stop between batch items (202, its document now with cancel_requested)", None,
     {200: JobDocument, 202: CancelRequested}, [_JOB_ID]),
    ("get", "/v1/jobs/{id}/events", "WebSocket: the job's document now, then at each change until final",
     None, {101: "websocket"}, [_JOB_ID]),
    ("get", "/v1/models", "Models in the store, with the live workers holding each", None, {200: ModelList}, []),
    ("get", "/v1/stats", "Serving stats of the fleet, its workers and models", None, {200: StatsResponse}, []),
    ("post", "/v1/keys", "Make an API key (its secret is in this answer only)", KeyRequest, {201: KeyCreated}, []),
    ("get", "/v1/keys", "Every API key (never their secrets)", None, {200: KeyList}, []),
    ("delete", "/v1/keys/{name}", "Revoke an API key", None, {200: KeyRevoked}, [_KEY_NAME]),
    ("get", "/v1/dead-letters", "Poison jobs and quarantined messages, newest first", None, {200: DeadLetterList},
     [_DL_QUEUE, _DL_LIMIT]),
    ("post", "/v1/dead-letters", "Requeue a poison job (as new: delivery count 0)", RequeueRequest, {202: Accepted},
     []),
    ("get", "/healthz", "Liveness of this API process", None, {200: Health}, []),
    ("get", "/readyz", "Readiness: Redis reachable and a live worker per configured pool", None,
     {200: Health, 503: ErrorResponse}, []),
    ("get", "/metrics", "Prometheus metrics", None, {200: "text/plain"}, []),
    ("get", "/v2/health/live", "Open Inference Protocol (KServe v2): liveness (200, empty body)", None,
     {200: "empty"}, []),
    ("get", "/v2/health/ready", "OIP readiness, the check of /readyz (200 with an empty body, else 503)", None,
     {200: "empty", 503: OipError}, []),
    ("get", "/v2", "OIP server metadata: name, version, extensions", None, {200: ServerMetadata}, []),
    ("get", "/v2/models/{name}", "OIP model metadata: the newest version's input and output tensors", None,
     {200: ModelMetadata, 404: OipError}, [_MODEL_NAME]),
    ("get", "/v2/models/{name}/versions/{version}", "OIP model metadata of one version", None,
     {200: ModelMetadata, 404: OipError}, [_MODEL_NAME, _MODEL_VERSION]),
    ("get", "/v2/models/{name}/ready", "OIP model readiness: 200 (empty body) when a live worker holds the model, "
     "else 503", None, {200: "empty", 404: OipError, 503: OipError}, [_MODEL_NAME]),
    ("get", "/v2/models/{name}/versions/{version}/ready", "OIP readiness of one version of a model", None,
     {200: "empty", 404: OipError, 503: OipError}, [_MODEL_NAME, _MODEL_VERSION]),
    ("post", "/v2/models/{name}/infer", "OIP infer: a predict job, enqueued and awaited (504 after 60 s); JSON "
     "tensors or the binary tensor extension", InferenceRequest, {200: InferenceResponse, 504: OipError},
     [_MODEL_NAME, _HEADER_LENGTH]),
    ("post", "/v2/models/{name}/versions/{version}/infer", "OIP infer on one version of a model", InferenceRequest,
     {200: InferenceResponse, 504: OipError}, [_MODEL_NAME, _MODEL_VERSION, _HEADER_LENGTH]),
    ("get", "/openapi.json", "This document", None, {200: "application/json"}, []),
    ("get", "/docs", "A browsable listing of this document", None, {200: "text/html"}, []),
]
_DESCRIPTIONS = {101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted", 400: "Malformed body",
                 401: "No valid API key", 403: "The key lacks the route's scope",
                 429: "Over the key's rate limit (or, on /events, its cap of open sockets)",
                 404: "Unknown job (or another key's), model or route", 409: "Job already final",
                 413: "Body too large (compressed, or once inflated)", 415: "Unsupported Content-Encoding",
                 422: "Invalid input", 500: "Internal error",
                 503: "Redis or the fleet unavailable (or, on /events, the API's cap of open sockets)",
                 504: "The job did not end within the wait; it goes on (GET /v1/jobs/{id})"}
#: The request body, whatever its schema.
_BODY = ("JSON or msgpack, optionally compressed (`Content-Encoding: gzip` or `deflate`); at most "
         "`API_MAX_BODY_BYTES`, compressed and once inflated.")
_OIP_BODY = ("An OIP inference request in JSON, or (binary tensor extension) its JSON header followed by the inputs' "
             "raw bytes; optionally compressed (`Content-Encoding: gzip` or `deflate`); at most `API_MAX_BODY_BYTES`.")
#: Answers without a body.
_NO_CONTENT = ("websocket", "empty")


def _response(status: int, target: Any, refs: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "")}
    if isinstance(target, str):
        if target not in _NO_CONTENT:
            out["content"] = {target: {"schema": {"type": "string" if target != "application/json" else "object"}}}
    else:
        out["content"] = {"application/json": {"schema": refs[(target, "serialization")]}}
    return out


@lru_cache(maxsize=1)
def build_spec() -> dict[str, Any]:
    """The OpenAPI document (built once per process; treat it as read-only)."""
    models = {m for _, _, _, m, _, _ in _ROUTES if m is not None}
    answers = {t for *_, responses, _ in _ROUTES for t in responses.values() if not isinstance(t, str)}
    answers.update((ErrorResponse, OipError))
    pairs = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    pairs += [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)]
    refs, top = models_json_schema(pairs, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, responses, params in _ROUTES:
        op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path.strip('/').replace('/', '_')}"}
        if params:
            op["parameters"] = params
        is_oip = path.startswith(_OIP_PREFIX)
        # NOTE: the auth middleware answers 401 / 403 / 429 before any OIP handler runs, so those keep the
        # fleet's ErrorResponse; what the OIP handlers raise is in the protocol's shape.
        error = OipError if is_oip else ErrorResponse
        if request is not None:
            schema = refs[(request, "validation")]
            content = {"application/json": {"schema": schema}}
            if is_oip:
                content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
            else:
                content.update({t: {"schema": schema} for t in _MSGPACK})
            op["requestBody"] = {"required": True, "description": _OIP_BODY if is_oip else _BODY, "content": content}
        answered = {s: _response(s, t, refs) for s, t in responses.items()}
        for status in ((400, 404, 413, 415, 422, 503) if request is not None
                       else (404, 422) if "{id}" in path else ()):
            answered.setdefault(status, _response(status, error, refs))
        if method == "delete":
            answered[409] = _response(409, ErrorResponse, refs)
        if path.endswith("/events"):
            answered[503] = _response(503, ErrorResponse, refs)
        if (method.upper(), path) in PUBLIC:
            op["security"] = []
        else:
            scope = ROUTE_SCOPES.get((method.upper(), path), "admin")
            op["description"] = f"Needs an API key with the `{scope}` scope (or `admin`)."
            for status in (401, 403, 429):
                answered[status] = _response(status, error, refs)
        answered[500] = _response(500, error, refs)
        op["responses"] = {str(s): r for s, r in sorted(answered.items())}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "FinSight Fleet", "version": shared.__version__,
                 "description": "Async inference jobs for forecasters and sentiment models on Celery + Redis. "
                                "Bodies are JSON or msgpack; every error is {\"error\": {type, message, field?}}. "
                                "The /v2 routes speak the Open Inference Protocol (KServe v2): JSON or binary "
                                "tensors, and errors raised past the key check as {\"error\": message, type, "
                                "retryable, field?}."},
        "paths": paths,
        "security": [{"ApiKey": []}, {"Bearer": []}],
        "components": {"schemas": top.get("$defs", {}), "securitySchemes": _SECURITY_SCHEMES},
    }
