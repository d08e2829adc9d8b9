"""API keys: made at random, stored only as hashes, looked up through a short-lived cache.

A key is ``fsk_`` + 43 URL-safe characters (256 random bits). Redis keeps, under the fleet prefix, the SHA-256
of each key with its name, scopes, optional rate limit and created / last-used times; the secret itself is shown
once, when it is made. A plain SHA-256 (not a slow password hash) is right here: the secrets are random and
long, so there is no dictionary to try, and the check runs on every request.

Static keys for deployments come from a JSON file (``API_KEYS_FILE``, e.g. a mounted Kubernetes Secret):
``[{"name": "ops", "key": "fsk_...", "scopes": ["admin"], "rate_limit": "1000/minute"}]``, where ``key_sha256``
(the hex digest) may stand in for ``key`` so that the file need not hold the secret.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cachetools import TTLCache
from limits import parse as parse_limit
from pydantic import BaseModel, Field, ValidationError, model_validator

from producer_api.security.principal import ANONYMOUS, SCOPES, Principal
from shared.errors import FleetError, InvalidInputError
from shared.keys import Keys

KEY_PREFIX = "fsk_"
#: Key names: what `fleet keys revoke NAME` and job records use; no separators, no whitespace.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class KeyExistsError(FleetError):
    """A key with that name exists already; revoke it first (names are unique)."""

    http_status = 409


def new_secret() -> str:
    """A fresh key: the prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The SHA-256 hex digest a key is stored and looked up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a set; :class:`InvalidInputError` naming the first unknown one."""
    found = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(found - set(SCOPES))
    if unknown or not found:
        raise InvalidInputError(f"scopes must be some of {', '.join(SCOPES)}; got {sorted(found) or 'none'}",
                                field="scopes")
    return found


def check_rate_limit(value: str | None) -> str | None:
    """``value`` when the ``limits`` library reads it (``100/minute``, ``10 per second``), else a typed 422."""
    if value is None:
        return None
    try:
        parse_limit(value)
    except ValueError:
        raise InvalidInputError(f"rate limit {value!r} is not like '100/minute'", field="rate_limit") from None
    return value


@dataclass(frozen=True)
class KeyInfo:
    """What ``fleet keys list`` shows of a key (never its secret)."""

    name: str
    scopes: tuple[str, ...]
    rate_limit: str | None
    created_at: float | None
    last_used_at: float | None
    source: str  # "redis" or "file"


class StaticKey(BaseModel):
    """One entry of ``API_KEYS_FILE``."""

    name: str = Field(pattern=NAME_PATTERN.pattern)
    key: str | None = Field(None, min_length=24)
    key_sha256: str | None = Field(None, pattern=_DIGEST.pattern)
    scopes: list[str] = Field(min_length=1)
    rate_limit: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "StaticKey":
        # NOTE: ValueErrors, not the fleet's typed errors: pydantic reports only those as validation errors.
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        if self.name == ANONYMOUS.name:
            raise ValueError(f"key name {self.name!r} is reserved")
        unknown = sorted(set(self.scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; scopes are {', '.join(SCOPES)}")
        if self.rate_limit is not None:
            parse_limit(self.rate_limit)  # a ValueError for a limit the limits library cannot read
        return self

    def hashed(self) -> str:
        return self.key_sha256 or digest(self.key or "")


def load_static_keys(path: Path) -> dict[str, Principal]:
    """The keys of an ``API_KEYS_FILE`` by digest.

    Raises:
        ValueError: the file is not a JSON list of valid entries, or names repeat (the API refuses to start).
    """
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list):
            raise ValueError("the file must hold a JSON list")
        keys = [StaticKey.model_validate(entry) for entry in entries]
    except (OSError, ValueError, ValidationError) as exc:
        raise ValueError(f"API_KEYS_FILE {path}: {exc}") from None
    names = [k.name for k in keys]
    if len(names) != len(set(names)):
        raise ValueError(f"API_KEYS_FILE {path}: key names repeat")
    return {k.hashed(): Principal(name=k.name, scopes=frozenset(k.scopes), rate_limit=k.rate_limit) for k in keys}


#: The name of the ``API_METRICS_KEY_FILE`` key in logs and rate limits.
METRICS_KEY_NAME = "prometheus"


def load_metrics_key(path: Path) -> dict[str, Principal]:
    """The scraper's key of an ``API_METRICS_KEY_FILE`` (the secret alone, surrounding whitespace ignored), with
    the ``metrics`` scope only: a leaked scrape token reads gauges and nothing else.

    Raises:
        ValueError: the file cannot be read or holds no plausible key (the API refuses to start).
    """
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"API_METRICS_KEY_FILE {path}: {exc}") from None
    if any(c.isspace() for c in secret):
        raise ValueError(f"API_METRICS_KEY_FILE {path}: expected one key, no whitespace")
    try:  # the rules of a static key (its length) apply to this one too
        key = StaticKey(name=METRICS_KEY_NAME, key=secret, scopes=["metrics"])
    except ValidationError as exc:
        raise ValueError(f"API_METRICS_KEY_FILE {path}: {exc}") from None
    return {key.hashed(): Principal(name=key.name, scopes=frozenset(key.scopes))}


def static_keys(keys_file: Path | None, metrics_key_file: Path | None) -> dict[str, Principal]:
    """Every static key the settings name, by digest.

    Raises:
        ValueError: either file is invalid, or a key of ``API_KEYS_FILE`` takes the scraper's name.
    """
    found = load_static_keys(keys_file) if keys_file else {}
    if metrics_key_file:
        if any(p.name == METRICS_KEY_NAME for p in found.values()):
            raise ValueError(f"API_KEYS_FILE {keys_file}: the name {METRICS_KEY_NAME!r} is the metrics key's")
        found.update(load_metrics_key(metrics_key_file))
    return found


def _text(raw: Any) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class KeyStore:
    """Keys in Redis (asyncio client) plus the static ones, with the lookup cache of one API process.

    Args:
        redis: An asyncio Redis client.
        keys: Key names under the fleet prefix.
        cache_seconds: How long a lookup (found or not) is trusted; a revoked key works at most this long.
        static: Keys from ``API_KEYS_FILE`` and ``API_METRICS_KEY_FILE`` by digest (checked first, never cached,
            never written).
    """

    def __init__(self, redis: Any, keys: Keys, cache_seconds: float = 5.0,
                 static: dict[str, Principal] | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.static = static or {}
        self._cache: TTLCache | None = TTLCache(maxsize=65536, ttl=cache_seconds) if cache_seconds > 0 else None

    # -- the hot path ----------------------------------------------------------------------------------------
    async def authenticate(self, secret: str) -> Principal | None:
        """The principal of ``secret``, or None for an unknown or revoked key."""
        hashed = digest(secret)
        static = self.static.get(hashed)
        if static is not None:
            return static
        if self._cache is not None and hashed in self._cache:
            return self._cache[hashed]
        found = await self._lookup(hashed)
        if self._cache is not None:
            # NOTE: misses are cached too: a client retrying a revoked key costs one Redis read per TTL.
            self._cache[hashed] = found
        return found

    async def _lookup(self, hashed: str) -> Principal | None:
        key = self.keys.api_key(hashed)
        record = {_text(k): _text(v) for k, v in (await self.redis.hgetall(key)).items()}
        if not record.get("name"):
            return None
        # last_used_at is written once per cache refresh of each API process, not once per request.
        await self.redis.hset(key, "last_used_at", time.time())
        return Principal(name=record["name"], scopes=frozenset(filter(None, record.get("scopes", "").split(","))),
                         rate_limit=record.get("rate_limit") or None)

    # -- management (``fleet keys``) -------------------------------------------------------------------------
    async def create(self, name: str, scopes: Iterable[str], rate_limit: str | None = None) -> str:
        """Store a new key and return its secret (shown once; only its digest is kept).

        Raises:
            InvalidInputError: a bad name, scope or rate limit.
            KeyExistsError: the name is taken (by a stored or a static key).
        """
        if not NAME_PATTERN.match(name):
            raise InvalidInputError(f"key name {name!r} must match {NAME_PATTERN.pattern}", field="name")
        if name == ANONYMOUS.name:
            # jobs submitted while auth was off are recorded as the anonymous caller's: no key may inherit them
            raise InvalidInputError(f"key name {name!r} is reserved", field="name")
        scope_set = check_scopes(scopes)
        check_rate_limit(rate_limit)
        if any(p.name == name for p in self.static.values()):
            raise KeyExistsError(f"a static key (API_KEYS_FILE) is named {name!r}", field="name")
        secret = new_secret()
        hashed = digest(secret)
        record = {"name": name, "scopes": ",".join(s for s in SCOPES if s in scope_set), "created_at": time.time()}
        if rate_limit:
            record["rate_limit"] = rate_limit
        # NOTE: HSETNX on the name index and the record in one MULTI would still write the record when the name
        # is taken; WATCH makes "name free -> claim it and write the record" one atomic step.
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.api_key_names())
            if await pipe.hexists(self.keys.api_key_names(), name):
                raise KeyExistsError(f"a key named {name!r} exists; revoke it first", field="name")
            pipe.multi()
            pipe.hset(self.keys.api_key_names(), name, hashed)
            pipe.hset(self.keys.api_key(hashed), mapping=record)
            await pipe.execute()
        return secret

    async def revoke(self, name: str) -> bool:
        """Delete the stored key named ``name``; False when there is none (static keys are revoked by
        removing them from their file)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.api_key_names())
            hashed = _text(await pipe.hget(self.keys.api_key_names(), name))
            if hashed is None:
                return False
            pipe.multi()
            pipe.hdel(self.keys.api_key_names(), name)
            pipe.delete(self.keys.api_key(hashed))
            await pipe.execute()
        if self._cache is not None:
            self._cache.pop(hashed, None)
        return True

    async def list(self) -> list[KeyInfo]:
        """Every key, stored and static, by name."""
        names = {_text(k): _text(v) for k, v in (await self.redis.hgetall(self.keys.api_key_names())).items()}
        pipe = self.redis.pipeline(transaction=False)
        for hashed in names.values():
            pipe.hgetall(self.keys.api_key(hashed))
        found = []
        for raw in await pipe.execute():
            record = {_text(k): _text(v) for k, v in raw.items()}
            if not record.get("name"):
                continue
            found.append(KeyInfo(
                name=record["name"], scopes=tuple(filter(None, record.get("scopes", "").split(","))),
                rate_limit=record.get("rate_limit") or None,
                created_at=float(record["created_at"]) if record.get("created_at") else None,
                last_used_at=float(record["last_used_at"]) if record.get("last_used_at") else None,
                source="redis"))
        found += [KeyInfo(name=p.name, scopes=tuple(s for s in SCOPES if s in p.scopes), rate_limit=p.rate_limit,
                          created_at=None, last_used_at=None, source="file") for p in self.static.values()]
        return sorted(found, key=lambda k: k.name)

