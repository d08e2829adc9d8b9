"""The caller of a request, as the auth middleware established it.

Handlers never look at headers: they ask :func:`principal_of` and check ownership with :meth:`Principal.owns`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import web

Scope = Literal["submit", "read", "admin", "metrics"]
#: Every scope; ``admin`` implies the others.
SCOPES: tuple[Scope, ...] = ("submit", "read", "admin", "metrics")


@dataclass(frozen=True)
class Principal:
    """A key's identity: its unique name, its scopes and its own rate limit (None: the configured one).

    Attributes:
        name: The key's name; jobs record it as their owner.
        scopes: What the key may do.
        rate_limit: A ``limits`` string that overrides ``API_RATE_LIMIT`` for this key.
        authenticated: False only for the stand-in of a fleet with ``API_AUTH_ENABLED=false``.
    """

    name: str
    scopes: frozenset[str]
    rate_limit: str | None = None
    authenticated: bool = True

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may see a job recorded with ``owner`` (None: sent by a plain Celery producer).

        Admin keys see every job; without auth there is one caller, who sees everything.
        """
        return self.is_admin or not self.authenticated or owner == self.name


#: The one caller of a fleet that runs without keys (``API_AUTH_ENABLED=false``).
ANONYMOUS = Principal(name="anonymous", scopes=frozenset(SCOPES), authenticated=False)
PRINCIPAL_KEY = web.RequestKey("fleet_principal", Principal)


def principal_of(request: web.Request) -> Principal:
    """The caller of ``request``; the auth middleware sets it on every request it lets through."""
    return request[PRINCIPAL_KEY]
