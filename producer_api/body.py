"""Decoding request bodies (JSON or msgpack) and query parameters, before any schema sees them.

Only syntax is checked here; the shapes are the pydantic schemas' business. Strict JSON: ``NaN`` and
``Infinity`` literals are refused, as are numbers that Python cannot hold (over 4300 digits) and nesting too
deep to parse; all of these are 400s, never 500s.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
from aiohttp import web

from producer_api.errors import BadRequestError
from shared.errors import InvalidInputError

JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
#: Longest ``?wait=`` a request may hold a connection for, in seconds.
MAX_WAIT_S = 60.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(raw: bytes, content_type: str) -> Any:
    """The decoded body; :class:`BadRequestError` when it is empty, malformed or of an unknown type."""
    if not raw:
        raise BadRequestError("the request body is empty; send a JSON (or msgpack) object")
    if content_type in MSGPACK_TYPES:
        try:
            return msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError)
            raise BadRequestError(f"malformed msgpack body: {type(exc).__name__}: {exc}") from None
    if content_type in JSON_TYPES or content_type.endswith("+json"):
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadRequestError(f"malformed JSON body: {exc}") from None
    raise BadRequestError(
        f"unsupported content type {content_type!r}; send application/json or application/msgpack"
    )


async def read_body(request: web.Request) -> Any:
    """Read and decode the request body (aiohttp enforces the size limit and raises 413 while reading)."""
    return decode(await request.read(), request.content_type)


def wait_param(request: web.Request) -> float | None:
    """The ``?wait=S`` query parameter: None when absent, else seconds in ``(0, 60]`` (422 otherwise)."""
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    # NOTE: NaN fails both comparisons, so "nan" and non-numbers land here too.
    if not 0 < value <= MAX_WAIT_S:
        raise InvalidInputError(f"wait must be a number of seconds, 0 < wait <= {MAX_WAIT_S:g}; got {raw!r}",
                                field="wait")
    return value
