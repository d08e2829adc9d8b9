"""Reading request bodies (raw, gzip or deflate; JSON or msgpack) and query parameters, before any schema sees them.

Only syntax and size are checked here; the shapes are the pydantic schemas' business. Sizes: a body over
``API_MAX_BODY_BYTES`` is a 413, compressed or not. aiohttp's own decompression is off for the app (it would
inflate a whole body before any limit is checked): a ``Content-Encoding: gzip`` or ``deflate`` body is inflated
here, chunk by chunk, into at most ``API_MAX_BODY_BYTES`` (one byte more is a 413, before the rest is inflated);
another encoding is a 415, a corrupt or truncated stream a 400.

Strict JSON (orjson): ``NaN`` and ``Infinity`` literals are refused, as are numbers that overflow a double
(``1e400``, 400-digit integers), lone surrogates and nesting deeper than 1024; all of these are 400s, never
500s. Integers beyond 64 bits are read as floats.

One shape is checked before decoding, because decoding is what it would cost: no body of the API holds an
array of more than :data:`~shared.schemas.MAX_CHANNELS` numbers (a series row is the widest), and a JSON body
over :data:`SCAN_MIN_BYTES` that does is refused with a 422 at regex speed (~7 ms per MB), before orjson builds
a document of ~30 bytes per number. A row of a million zeros (2 MB) would otherwise cost ~30 MB to refuse.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import msgpack
import orjson
from aiohttp import web

from producer_api.errors import BadRequestError, PayloadTooLargeError
from shared.errors import FleetError, InvalidInputError
from shared.schemas import MAX_CHANNELS

JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
#: Content-Encoding -> zlib window bits (deflate is told apart from raw deflate by its first byte).
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: Bytes of a compressed body read (and so, at most, inflated past the limit) per step.
READ_CHUNK_BYTES = 64 * 1024
#: JSON bodies smaller than this are decoded without the scan for wide arrays: decoding them costs less.
SCAN_MIN_BYTES = 64 * 1024
#: An array opening on more than MAX_CHANNELS numbers (possessive: a failed try never backtracks).
_WIDE_ARRAY = re.compile(rb"\[(?:\s*+[-+0-9.eE]++\s*+,){%d}" % MAX_CHANNELS)
#: A JSON string (or an unterminated one, to the end: the scan stays linear on any input).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.S)
#: Longest ``?wait=`` a request may hold a connection for, in seconds.
MAX_WAIT_S = 60.0


class UnsupportedEncodingError(FleetError):
    """The body's ``Content-Encoding`` is not one the API reads (gzip, deflate or none)."""

    http_status = 415


def _too_large(limit: int, what: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the request body is larger than API_MAX_BODY_BYTES={limit} bytes {what}")


class Inflater:
    """Inflates one gzip or deflate body into at most ``limit`` bytes, chunk by chunk.

    Args:
        encoding: ``gzip`` (``x-gzip``) or ``deflate`` (zlib-wrapped as RFC 9110 says, or raw as some clients
            send it).
        limit: Most bytes the inflated body may hold; :meth:`feed` raises as soon as one more would come out.
    """

    def __init__(self, encoding: str, limit: int) -> None:
        self.wbits = ENCODINGS[encoding]
        self.gzip = encoding != "deflate"
        self.limit = limit
        self.out = bytearray()
        self._stream: Any = None
        self._ended = False

    def _start(self, first: bytes) -> Any:
        # A zlib stream's first byte says "deflate, window <= 32K" in its low nibble (8); raw deflate does not.
        raw = not self.gzip and first[0] & 0x0F != 8
        return zlib.decompressobj(-zlib.MAX_WBITS if raw else self.wbits)

    def feed(self, data: bytes) -> None:
        """Inflate the next compressed chunk.

        Raises:
            PayloadTooLargeError: the body inflates past ``limit`` (413).
            BadRequestError: the stream is corrupt, or has bytes after its end (400).
        """
        while data:
            if self._ended:
                if not self.gzip:
                    raise BadRequestError("malformed deflate body: bytes after the end of the stream")
                self._ended, self._stream = False, None  # gzip: another member follows (RFC 1952 allows many)
            if self._stream is None:
                self._stream = self._start(data)
            try:
                # NOTE: max_length stops zlib one byte past the limit: a bomb is refused after inflating at most
                # limit + 1 bytes, whatever its ratio; the input it did not reach waits in unconsumed_tail.
                piece = self._stream.decompress(data, self.limit - len(self.out) + 1)
            except zlib.error as exc:
                raise BadRequestError(f"malformed {'gzip' if self.gzip else 'deflate'} body: {exc}") from None
            self.out += piece
            if len(self.out) > self.limit:
                raise _too_large(self.limit, "once decompressed")
            if self._stream.eof:
                self._ended = True
                data = self._stream.unused_data
            else:
                data = self._stream.unconsumed_tail

    def finish(self) -> bytearray:
        """The inflated body; :class:`BadRequestError` when the stream was cut short."""
        if self._stream is not None and not self._ended:
            raise BadRequestError(f"malformed {'gzip' if self.gzip else 'deflate'} body: the stream is truncated")
        return self.out


def has_wide_numeric_array(raw: bytes | bytearray) -> bool:
    """Whether a JSON text holds an array of more than :data:`MAX_CHANNELS` numbers, decoding nothing."""
    if _WIDE_ARRAY.search(raw) is None:
        return False
    # A match may lie inside a string (a headline quoting numbers): look again with every string blanked.
    return _WIDE_ARRAY.search(_STRING.sub(b'""', raw)) is not None


def decode(raw: bytes | bytearray, content_type: str) -> Any:
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
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:  # syntax, NaN / Infinity, overflowing numbers, depth, bad UTF-8
            raise BadRequestError(f"malformed JSON body: {exc}") from None
    raise BadRequestError(
        f"unsupported content type {content_type!r}; send application/json or application/msgpack"
    )


async def read_raw(request: web.Request) -> bytes | bytearray:
    """The body's bytes, inflated when it is compressed; never more than ``client_max_size`` of them.

    Raises:
        PayloadTooLargeError: the body, compressed or inflated, is over the limit (413).
        UnsupportedEncodingError: a ``Content-Encoding`` other than gzip or deflate (415).
        BadRequestError: a corrupt or truncated compressed body (400).
    """
    limit = request.client_max_size  # the app's, i.e. API_MAX_BODY_BYTES
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return await request.read()  # aiohttp enforces client_max_size and raises 413 while reading
    if encoding not in ENCODINGS:
        raise UnsupportedEncodingError(f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or none",
                                       field="Content-Encoding")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, "compressed")
    inflater, received = Inflater(encoding, limit), 0
    async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
        received += len(chunk)
        if received > limit:
            raise _too_large(limit, "compressed")
        inflater.feed(chunk)
    return inflater.finish()


async def read_body(request: web.Request, row_field: str | None = None) -> Any:
    """Read, inflate (see :func:`read_raw`) and decode the request body.

    Args:
        row_field: The field to name when a large JSON body holds an array wider than a series row may be
            (422 before decoding); None skips that scan.
    """
    raw = await read_raw(request)
    if row_field is not None and len(raw) >= SCAN_MIN_BYTES and request.content_type not in MSGPACK_TYPES \
            and has_wide_numeric_array(raw):
        raise InvalidInputError(f"{row_field}: the body holds an array of more than {MAX_CHANNELS} numbers; a "
                                f"series row holds at most {MAX_CHANNELS} channels", field=row_field)
    return decode(raw, request.content_type)


def wait_param(request: web.Request) -> float | None:
    """The ``?wait=S`` query parameter: None when absent, else seconds in ``(0, 60]`` (422 otherwise).

    Every value admitted is honoured: the tiniest (``5e-324``) answers after one read of the job, the longest
    after 60 s at most (see :meth:`producer_api.watch.JobWatch.until_final`).
    """
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
