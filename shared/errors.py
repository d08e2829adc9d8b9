"""One error root for the whole fleet.

Every error carries machine-readable fields: the HTTP status the API answers with, whether retrying the same
job later can succeed, and a stable ``type`` name. Errors cross process boundaries as ``{type, message}``
(never pickled): :meth:`FleetError.to_dict` on one side, :func:`error_from_dict` on the other.
"""

from __future__ import annotations

import math
from typing import Any


class FleetError(Exception):
    """Base class of every error the fleet raises on purpose."""

    http_status: int = 500
    retryable: bool = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        # NOTE: args stays (message,) so that Celery's JSON exception encoding round-trips it.
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def type(self) -> str:
        return type(self).__name__

    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP answer carrying this error adds (``WWW-Authenticate``, ``Retry-After``, ...)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "message": self.message, "retryable": self.retryable}
        if self.field:
            body["field"] = self.field
        return body


class InvalidInputError(FleetError):
    """The job's input does not fit the model or the schema."""

    http_status = 422


class ModelNotFoundError(FleetError):
    """No such model in the store, or it is not loaded where it was asked for."""

    http_status = 404


class JobNotFoundError(FleetError):
    """No job with that id (never enqueued, or its record expired)."""

    http_status = 404


class ModelLoadError(FleetError):
    """The model exists but could not be loaded (corrupt files, wrong config)."""

    http_status = 500


class PredictionError(FleetError):
    """The model failed while running a valid input."""

    http_status = 500


class AdapterUnavailableError(FleetError):
    """The serving runtime (a Triton or TorchServe server, a device) cannot be reached now."""

    http_status = 503
    retryable = True


class BrokerUnavailableError(FleetError):
    """Redis (broker, result backend or stats store) cannot be reached now."""

    http_status = 503
    retryable = True


class DeadlineExceededError(FleetError):
    """The job's deadline passed before a worker could run it."""

    http_status = 504


class JobTimeoutError(FleetError):
    """The job ran past its time limit (``JOB_TIME_LIMIT_SECONDS``) and was stopped."""

    http_status = 504


class PoisonJobError(FleetError):
    """The job was delivered ``JOB_MAX_DELIVERIES`` times and never finished (each run killed its process, or ran
    past its time limit); its message went to its pool's dead-letter list."""

    http_status = 500


class JobCancelledError(FleetError):
    """The job was cancelled before it finished."""

    http_status = 409


class AuthenticationError(FleetError):
    """The request carries no API key, or one the fleet does not know (revoked, mistyped)."""

    http_status = 401

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="finsight-fleet"'}


class PermissionDeniedError(FleetError):
    """The API key is valid but lacks the scope this route needs."""

    http_status = 403


class RateLimitedError(FleetError):
    """The API key made more requests than its rate limit allows in the current window."""

    http_status = 429
    retryable = True

    def __init__(self, message: str, *, limit: int = 0, remaining: int = 0, reset_after_s: float = 1.0,
                 field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.limit = limit
        self.remaining = remaining
        self.reset_after_s = reset_after_s

    def http_headers(self) -> dict[str, str]:
        # NOTE: the IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers): reset is delta-seconds.
        reset = str(max(1, math.ceil(self.reset_after_s)))
        return {"Retry-After": reset, "RateLimit-Limit": str(self.limit),
                "RateLimit-Remaining": str(self.remaining), "RateLimit-Reset": reset}


class InternalError(FleetError):
    """An unexpected failure; the message says what happened, the worker keeps serving."""

    http_status = 500


def _all_subclasses(cls: type[FleetError]) -> dict[str, type[FleetError]]:
    found = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


def error_from_dict(data: dict[str, Any]) -> FleetError:
    """Rebuild a typed error from its ``{type, message}`` form; unknown types become :class:`InternalError`."""
    cls = _all_subclasses(FleetError).get(str(data.get("type")), InternalError)
    err = cls(str(data.get("message", "")), field=data.get("field"))
    return err


def as_fleet_error(exc: BaseException) -> FleetError:
    """Wrap any exception into the error root, keeping typed ones as they are."""
    if isinstance(exc, FleetError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}")
