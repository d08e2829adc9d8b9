"""The fleet's async ``JobService`` (``protos/jobs.proto``): Submit, GetJob, WatchJob, CancelJob.

The gRPC twin of the REST job routes, over the same :mod:`producer_api.service.jobs`: a request becomes the body
its REST route would read, so :func:`~producer_api.enqueue.parse_job` validates it with the same schema, bounds and
store check, and errors name the proto's fields (``series``, ``texts``, ``model.symbol``). ``WatchJob`` streams the
job document now and at each change until the final one, as the WebSocket does, within the same caps
(:mod:`producer_api.service.streams`) and lifetime (``API_WEBSOCKET_MAX_SECONDS``).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator

from google.protobuf import struct_pb2

from producer_api.enqueue import parse_job
from producer_api.grpc.handlers import Call
from producer_api.grpc.protos import jobs_pb2 as pb
from producer_api.jobdoc import JobDocument
from producer_api.security.middleware import SUBMIT_ROUTES
from producer_api.service import jobs
from producer_api.watch import JobWatch
from shared.errors import FleetError, InvalidInputError

SERVICE = pb.DESCRIPTOR.services_by_name["JobService"]
METHODS = ("Submit", "GetJob", "WatchJob", "CancelJob")

#: Field names of the REST body (as the job's schema reports them) -> the proto's names.
_RENAMES = ((re.compile(r"^(requests\.\d+\.)?inputs\.(tensor|series)"), r"\1series"),
            (re.compile(r"^(requests\.\d+\.)?inputs\.texts"), r"\1texts"),
            (re.compile(r"^(requests\.\d+\.)?(symbol|timeframe|model_type|version)\b"), r"\1model.\2"),
            (re.compile(r"^(adapter|device)\b"), r"placement.\1"))


class UnavailableStreamError(FleetError):
    """The watch was open for ``API_WEBSOCKET_MAX_SECONDS``; watch again to go on."""

    http_status = 503
    retryable = True


def _model(ref: pb.ModelRef) -> dict[str, Any]:
    body: dict[str, Any] = {"symbol": ref.symbol, "timeframe": ref.timeframe, "model_type": ref.model_type}
    if ref.version:
        body["version"] = ref.version
    return body


def _placement(placement: pb.Placement) -> dict[str, Any]:
    return {name: value for name in ("adapter", "device") if (value := getattr(placement, name))}


def _predict(job: pb.PredictJob, placement: bool = True) -> dict[str, Any]:
    body = _model(job.model)
    if placement:
        body.update(_placement(job.placement))
    which = job.WhichOneof("inputs")
    if which == "series":
        body["inputs"] = {"tensor": {"dtype": "float32", "shape": list(job.series.shape), "data": job.series.data}}
    elif which == "texts":
        body["inputs"] = {"texts": list(job.texts.texts)}
    else:
        raise InvalidInputError("a predict job needs series (forecasters) or texts (sentiment models)",
                                field="series")
    for name in ("n_steps", "priority", "deadline_s"):
        if job.HasField(name):
            body[name] = getattr(job, name)
    return body


def job_body(request: pb.SubmitRequest) -> tuple[str, dict[str, Any]]:
    """The job's kind and the body its REST route would read."""
    kind = request.WhichOneof("job")
    if kind is None:
        raise InvalidInputError("SubmitRequest holds no job: set load, unload, predict or batch_predict",
                                field="job")
    job = getattr(request, kind)
    if kind == "predict":
        return kind, _predict(job)
    if kind == "batch_predict":
        body: dict[str, Any] = {"requests": [_predict(item, placement=False) for item in job.requests],
                                **_placement(job.placement)}
        if job.HasField("priority"):
            body["priority"] = job.priority
        return kind, body
    return kind, {**_model(job.model), **_placement(job.placement)}


def renamed(err: FleetError) -> FleetError:
    """``err``, naming the proto's field where the job's schema named the REST body's."""
    if err.field:
        for pattern, replacement in _RENAMES:
            new = pattern.sub(replacement, err.field, count=1)
            if new != err.field:
                err.message = err.message.replace(err.field, new)
                err.field = new
                err.args = (err.message,)
                break
    return err


def job_message(doc: JobDocument) -> pb.Job:
    """A job document as the proto's ``Job``."""
    out = pb.Job(job_id=doc.job_id, kind=doc.kind or "", status=doc.status, final=doc.final,
                 worker=doc.worker or "", adapter=doc.adapter or "", device=doc.device or "")
    if doc.progress is not None:
        out.progress.done, out.progress.total = doc.progress.done, doc.progress.total
    if doc.error is not None:
        out.error.CopyFrom(pb.JobError(type=doc.error.type, message=doc.error.message, field=doc.error.field or "",
                                       retryable=doc.error.retryable))
    for name, value in doc.timings.model_dump().items():
        if value is not None:
            setattr(out.timings, name, value)
    if isinstance(doc.result, dict):
        result = struct_pb2.Struct()
        result.update(doc.result)
        out.result.CopyFrom(result)
    return out


class JobServicer:
    """The job service's methods over :mod:`producer_api.service.jobs` (each gets its :class:`Call`)."""

    async def Submit(self, request: pb.SubmitRequest, call: Call) -> pb.SubmitResponse:
        try:
            kind, body = job_body(request)
        except FleetError as exc:
            raise renamed(exc) from None
        await call.admit(SUBMIT_ROUTES[kind])  # loads and unloads need admin, predicts submit
        try:
            job = parse_job(call.api, kind, body)
        except FleetError as exc:
            raise renamed(exc) from None
        job_id, _ = await jobs.enqueue(call.api, kind, job, call.principal)
        return pb.SubmitResponse(job_id=job_id, job=job_message(JobDocument(job_id=job_id, kind=kind,
                                                                             status="queued")))

    async def GetJob(self, request: pb.GetJobRequest, call: Call) -> pb.Job:
        return job_message(await jobs.read(call.api, request.job_id, call.principal))

    async def CancelJob(self, request: pb.GetJobRequest, call: Call) -> pb.CancelJobResponse:
        doc, cancelled = await jobs.cancel(call.api, request.job_id, call.principal)
        return pb.CancelJobResponse(job=job_message(doc), cancelled=cancelled, cancel_requested=not cancelled)

    async def WatchJob(self, request: pb.GetJobRequest, call: Call) -> AsyncIterator[pb.Job]:
        api = call.api
        with api.streams.hold(call.principal):
            async with JobWatch(api.channels, api.records, request.job_id, call.principal) as watch:
                first = await watch.current()
                yield job_message(first)
                deadline = asyncio.get_running_loop().time() + api.settings.api_websocket_max_seconds
                last = first
                async for last in watch.changes(first, deadline=deadline):
                    yield job_message(last)
                if not last.final:
                    raise UnavailableStreamError(
                        f"watched for API_WEBSOCKET_MAX_SECONDS={api.settings.api_websocket_max_seconds:g} s; "
                        f"job {request.job_id} is {last.status}: watch again to go on", field="job_id")
