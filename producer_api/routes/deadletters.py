"""Dead letters (``admin`` scope): ``GET /v1/dead-letters`` lists them, ``POST /v1/dead-letters`` requeues one."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from producer_api import deadletters
from producer_api.body import read_body
from producer_api.context import ctx
from producer_api.errors import validation_error
from producer_api.responses import Accepted, json_document
from shared.errors import InvalidInputError

routes = web.RouteTableDef()
#: Most entries one listing answers.
MAX_LIMIT = 1000


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidInputError(f"limit must be an integer in [1, {MAX_LIMIT}]; got {raw!r}", field="limit")
    return int(raw)


def _queue(request: web.Request) -> str | None:
    queue = request.query.get("queue")
    if queue is not None and queue not in deadletters.pool_queues():
        raise InvalidInputError(f"queue must be a pool queue (infer.<adapter>.<device>); got {queue!r}",
                                field="queue")
    return queue


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    c = ctx(request)
    found = await deadletters.list_dead_letters(c.redis, c.keys, _queue(request), _limit(request))
    return json_document(deadletters.DeadLetterList(dead_letters=found))


@routes.post("/v1/dead-letters")
async def requeue_dead_letter(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        wanted = deadletters.RequeueRequest.model_validate(await read_body(request))
    except ValidationError as exc:
        raise validation_error(exc) from None
    await deadletters.requeue(c.redis, c.keys, wanted.job_id, c.settings.result_ttl_seconds)
    return json_document(Accepted.for_job(wanted.job_id), status=202)
