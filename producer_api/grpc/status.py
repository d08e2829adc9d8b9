"""Fleet errors as gRPC statuses: the code from the error's HTTP status, the typed error in trailing metadata.

A client reads the status code and details as any gRPC client does (``tritonclient.grpc`` raises them as an
``InferenceServerException``); the fleet's typed fields travel as ``x-fleet-error-type``,
``x-fleet-error-retryable`` and ``x-fleet-error-field``, and a rate limit's ``retry-after`` as itself, so that
nothing is pickled and every language's client can read them.
"""

from __future__ import annotations

import grpc

from shared.errors import FleetError

#: HTTP status of a fleet error -> the gRPC code that means the same (Google's API design mapping).
CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
TYPE_KEY = "x-fleet-error-type"
RETRYABLE_KEY = "x-fleet-error-retryable"
FIELD_KEY = "x-fleet-error-field"


def code_of(err: FleetError) -> grpc.StatusCode:
    """The gRPC code of ``err``: its HTTP status mapped, else INTERNAL for 5xx and UNKNOWN otherwise."""
    found = CODES.get(err.http_status)
    if found is not None:
        return found
    return grpc.StatusCode.INTERNAL if err.http_status >= 500 else grpc.StatusCode.UNKNOWN


def trailing_metadata(err: FleetError) -> tuple[tuple[str, str], ...]:
    """The typed error's fields (and its HTTP headers, lower-cased, such as ``retry-after``) as metadata."""
    out = [(TYPE_KEY, err.type), (RETRYABLE_KEY, "true" if err.retryable else "false")]
    if err.field:
        out.append((FIELD_KEY, err.field))
    out.extend((name.lower(), str(value)) for name, value in err.http_headers().items()
               if name.lower() != "www-authenticate")
    return tuple(out)
