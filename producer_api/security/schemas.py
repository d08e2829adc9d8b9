"""Request and response bodies of the key routes (``/v1/keys``), as pydantic models (the docs use them too)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from producer_api.security.keystore import NAME_PATTERN, KeyInfo
from producer_api.security.principal import Scope


class KeyRequest(BaseModel):
    """A new key: its unique name, its scopes and, optionally, a rate limit of its own."""

    name: str = Field(pattern=NAME_PATTERN.pattern)
    scopes: list[Scope] = Field(min_length=1)
    rate_limit: str | None = Field(None, max_length=64, examples=["1000/minute"])
    """Overrides ``API_RATE_LIMIT`` for this key (the ``limits`` notation)."""


class KeyView(BaseModel):
    """A key as listed: never its secret."""

    name: str
    scopes: list[str]
    rate_limit: str | None = None
    created_at: float | None = None
    last_used_at: float | None = None
    source: str
    """``redis`` (made with ``fleet keys create`` or ``POST /v1/keys``) or ``file`` (``API_KEYS_FILE``)."""

    @classmethod
    def of(cls, info: KeyInfo) -> "KeyView":
        return cls(name=info.name, scopes=list(info.scopes), rate_limit=info.rate_limit, created_at=info.created_at,
                   last_used_at=info.last_used_at, source=info.source)


class KeyCreated(BaseModel):
    """The new key's secret, shown this once: the fleet keeps only its SHA-256."""

    name: str
    scopes: list[str]
    rate_limit: str | None = None
    key: str


class KeyList(BaseModel):
    keys: list[KeyView]


class KeyRevoked(BaseModel):
    name: str
    revoked: bool
