"""Caps on open event streams (WebSocket ``/v1/jobs/{id}/events`` and gRPC ``WatchJob``), counted together.

A stream holds a pub/sub subscription and re-reads its job every few seconds until the job ends; without a cap a
client could open them without end. The caps are ``API_MAX_WEBSOCKETS`` per API process and
``API_MAX_WEBSOCKETS_PER_KEY`` per API key, whichever transport the streams use.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from producer_api.security.principal import Principal
from shared.errors import FleetError


class TooManySocketsError(FleetError):
    """The API key holds ``API_MAX_WEBSOCKETS_PER_KEY`` event streams already; close one first."""

    http_status = 429
    retryable = True


class SocketsExhaustedError(FleetError):
    """This API process holds ``API_MAX_WEBSOCKETS`` event streams already; retry later."""

    http_status = 503
    retryable = True


class SocketSlots:
    """Open event streams of one API process, counted overall and per key.

    A slot is taken before anything is awaited (the check and the count are one step), so that concurrent
    openings cannot overshoot the caps. Without authentication every caller is the same anonymous one: only the
    overall cap applies then.
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self.held: Counter[str] = Counter()

    @contextmanager
    def hold(self, principal: Principal) -> Iterator[None]:
        """Hold one slot for ``principal`` while the block runs.

        Raises:
            TooManySocketsError: the key's cap is reached (429).
            SocketsExhaustedError: the process's cap is reached (503).
        """
        name = principal.name
        if principal.authenticated and self.held[name] >= self.per_key:
            raise TooManySocketsError(f"API key {name!r} holds {self.held[name]} event streams, the most "
                                      f"API_MAX_WEBSOCKETS_PER_KEY allows; close one first")
        if sum(self.held.values()) >= self.total:
            raise SocketsExhaustedError(f"this API process holds {self.total} event streams, the most "
                                        "API_MAX_WEBSOCKETS allows; retry later")
        self.held[name] += 1
        try:
            yield
        finally:
            self.held[name] -= 1
            if not self.held[name]:
                del self.held[name]
