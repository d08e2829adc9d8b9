"""The Open Inference Protocol's operations, transport-neutral: model lookup, readiness, infer.

:mod:`producer_api.oip` holds the protocol's forms and their translation to and from fleet jobs; the REST routes
(:mod:`producer_api.routes.oip`) and the gRPC ``GRPCInferenceService`` (:mod:`producer_api.grpc.inference`) decode
their wire into an :class:`~producer_api.oip.InferenceRequest` plus raw tensor bytes, call :func:`infer`, and
encode what it answers. An infer is a ``/v1/predict`` job: validated by :func:`~producer_api.enqueue.parse_job`,
recorded and sent under the caller's key, awaited for at most :data:`INFER_WAIT_S`; so it takes the same queues,
batching, stats, scopes and rate limits whichever way it came.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
from cachetools import TTLCache

from producer_api import oip
from producer_api.body import MAX_WAIT_S
from producer_api.context import STORE_CHECK_TTL_S, ApiContext
from producer_api.enqueue import parse_job
from producer_api.fleetview import live_workers
from producer_api.jobdoc import JobDocument
from producer_api.security.principal import Principal
from producer_api.service import jobs
from shared.errors import FleetError
from shared.schemas import ModelKey, PredictionResult

#: Longest an infer waits for its job, in seconds (as ``?wait`` on ``/v1/predict``); then a timeout naming the job.
INFER_WAIT_S = MAX_WAIT_S
#: (store root, model id, version or None) -> :class:`producer_api.oip.StoredVersion`: an infer reads the disk
#: once per model per STORE_CHECK_TTL_S, as a predict does.
_STORED: TTLCache = TTLCache(maxsize=4096, ttl=STORE_CHECK_TTL_S)


async def stored(c: ApiContext, name: str, version: str | None) -> tuple[ModelKey, oip.StoredVersion]:
    """The model a protocol name names, and that version of it in the store.

    Raises:
        ModelNotFoundError: the name is no model id, or the store lacks the model or the version (404).
    """
    key = oip.model_key(name)
    cached = (str(c.settings.model_store_dir), key.model_id, version)
    found = _STORED.get(cached)
    if found is None:
        # NOTE: reading the store is blocking file IO; keep it off the event loop.
        found = await asyncio.get_running_loop().run_in_executor(
            None, oip.read_model, c.settings.model_store_dir, key, version)
        _STORED[cached] = found
    return key, found


async def holders(c: ApiContext, model_id: str, version: str | None) -> list[str]:
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


async def model_ready(c: ApiContext, name: str, version: str | None) -> tuple[ModelKey, bool]:
    """Whether a live worker process holds the model (404 for a model not stored)."""
    key, _ = await stored(c, name, version)
    return key, bool(await holders(c, key.model_id, version))


@dataclass(frozen=True)
class InferOutcome:
    """A finished infer: the model, its job's document, the result, and the outputs the caller asked for."""

    key: ModelKey
    doc: JobDocument
    result: PredictionResult
    wanted: dict[str, bool]

    def parameters(self) -> dict[str, oip.Parameter]:
        """The response's parameters: the fleet's ``job_id``, ``inference_time_ms`` and ``worker``."""
        out: dict[str, oip.Parameter] = {"job_id": self.doc.job_id,
                                         "inference_time_ms": self.result.inference_time_ms}
        if self.doc.worker:
            out["worker"] = self.doc.worker
        return out

    def tensors(self) -> list[oip.OutputTensor]:
        """The outputs asked for, in the signature's order."""
        return [t for t in oip.result_tensors(self.key, self.result) if t.name in self.wanted]


async def infer(c: ApiContext, principal: Principal, key: ModelKey, found: oip.StoredVersion,
                request: oip.InferenceRequest, binary: memoryview, version: str | None) -> InferOutcome:
    """Run an infer as a predict job and await its result.

    Raises:
        InvalidInputError: the request does not fit the signature or the job's schema (naming the input).
        InferTimeoutError: the job did not end within :data:`INFER_WAIT_S` (it goes on).
        FleetError: the job's own typed error when it failed.
    """
    wanted = oip.requested_outputs(request, found.signature)  # before the job: a bad output must not run one
    try:
        job = parse_job(c, "predict", oip.job_body(key, found.signature, request, binary, version))
    except FleetError as exc:
        raise oip.renamed(exc) from None
    job_id, doc = await jobs.enqueue(c, "predict", job, principal, INFER_WAIT_S)
    if doc is None:
        raise oip.InferTimeoutError(f"job {job_id} did not end within {INFER_WAIT_S:g} s; it goes on: GET "
                                    f"/v1/jobs/{job_id} reads it", field="job_id")
    return InferOutcome(key, doc, oip.job_result(doc), wanted)
