"""API errors and the one middleware that turns every failure into the fleet's JSON error shape.

Every error body is ``{"error": {"type", "message", "retryable", "field"?}}``. Handlers raise; they never build error
responses themselves. Typed fleet errors carry their HTTP status (request validation raises them through
:func:`validation_error`); aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) are
mapped here, and Redis or broker outages become 503 at once. Anything else is a bug: it is logged with its
traceback and answered as a 500 ``InternalError`` without leaking details.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Sequence

from aiohttp import web
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import BrokerUnavailableError, FleetError, InternalError, InvalidInputError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Failures that mean "Redis (broker, backend, stats) cannot take this now", not a bug: unreachable, still loading
#: its AOF after a restart (a ConnectionError), full under ``maxmemory`` + ``noeviction`` (nothing is written, so
#: the client may retry), or a replica that a failover left read-only.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, RedisOutOfMemoryError, RedisReadOnlyError,
               KombuOperationalError)


class BadRequestError(FleetError):
    """The body is not valid JSON or msgpack, or has a content type the API does not read."""

    http_status = 400


class RouteNotFoundError(FleetError):
    """No route matches the request path."""

    http_status = 404


class MethodNotAllowedError(FleetError):
    """The path exists but not with this HTTP method."""

    http_status = 405


class JobFinishedError(FleetError):
    """The job already reached a final state; it can no longer be cancelled."""

    http_status = 409


class PayloadTooLargeError(FleetError):
    """The body is larger than ``API_MAX_BODY_BYTES``."""

    http_status = 413


class NotReadyError(FleetError):
    """The fleet cannot serve now (a configured pool has no live worker)."""

    http_status = 503


def validation_error(exc: ValidationError, prefix: Sequence[str | int] = ()) -> InvalidInputError:
    """The first pydantic error as a typed 422, its field named by the dotted ``loc`` (``requests.3.inputs``)."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    field = ".".join(str(part) for part in (*prefix, *first.get("loc", ())))
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    message = f"{field}: {first.get('msg')}{more}" if field else f"{first.get('msg')}{more}"
    return InvalidInputError(message, field=field or None)


def _from_http(request: web.Request, exc: web.HTTPException) -> FleetError:
    if exc.status == 404:
        return RouteNotFoundError(f"no route for {request.method} {request.path}")
    if exc.status == 405:
        return MethodNotAllowedError(f"{request.method} is not allowed on {request.path}")
    if exc.status == 413:
        return PayloadTooLargeError(exc.text or "the request body is too large")
    if exc.status == 400:
        return BadRequestError(exc.text or exc.reason)
    err = FleetError(exc.text or exc.reason)
    err.http_status = exc.status
    return err


def oip_error_body(err: FleetError) -> dict[str, Any]:
    """``err`` as the Open Inference Protocol shapes errors (``/v2``): ``{"error": "<message>", type, ...}``; its
    clients (tritonclient, KServe's) read ``error`` as a string."""
    typed = err.to_dict()
    return {"error": typed.pop("message"), **typed}


def is_oip(request: web.Request) -> bool:
    return request.path == "/v2" or request.path.startswith("/v2/")


def error_response(err: FleetError, headers: dict[str, str] | None = None, oip: bool = False) -> web.Response:
    """The one JSON error shape (the protocol's under ``/v2``), with the error's HTTP status and headers."""
    body = oip_error_body(err) if oip else {"error": err.to_dict()}
    return web.json_response(body, status=err.http_status, headers={**err.http_headers(), **(headers or {})})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception a handler raises into ``{"error": {...}}`` with the right status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(_from_http(request, exc), headers, oip=is_oip(request))
    except FleetError as exc:
        return error_response(exc, oip=is_oip(request))
    except UNAVAILABLE as exc:
        log.warning("%s %s: Redis or the broker is unreachable: %s", request.method, request.path, exc)
        return error_response(BrokerUnavailableError(f"Redis or the broker cannot be reached now: {exc}"),
                              oip=is_oip(request))
    except Exception:  # a true bug: log it with its traceback, answer without details
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError("internal error; the API logged the details"), oip=is_oip(request))
