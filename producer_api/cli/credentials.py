"""The local credentials ``fleet up`` makes on first start and the CLI's producer commands use.

Both live in the state dir, readable by their owner only: ``api-key`` (an admin API key, stored in Redis as a
hash like any other) and ``flower-password`` (Flower's basic-auth password for the user ``admin``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from shared.settings import FleetSettings, state_dir

#: Name of the admin key ``fleet up`` makes for its user.
LOCAL_KEY_NAME = "fleet-up-admin"
#: The local operator's own rate limit: the one-machine fleet is theirs, and scripts poll it.
LOCAL_KEY_RATE_LIMIT = "6000/minute"
FLOWER_USER = "admin"


def api_key_file() -> Path:
    return state_dir() / "api-key"


def flower_password_file() -> Path:
    return state_dir() / "flower-password"


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0600 from the start (never world-readable, even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    os.chmod(path, 0o600)  # a file that existed keeps its old mode through O_CREAT


def read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def client_api_key(settings: FleetSettings) -> str | None:
    """The key producer commands send: ``FLEET_API_KEY``, else the one ``fleet up`` wrote, else none."""
    if settings.fleet_api_key is not None:
        return settings.fleet_api_key.get_secret_value()
    return read_secret(api_key_file())


def ensure_local_admin_key(settings: FleetSettings) -> str:
    """The admin key of this machine's fleet: the one in the state dir while Redis knows it, else a new one
    (replacing a stale ``fleet-up-admin`` key, say after the state dir was wiped but Redis kept its data)."""
    from redis.asyncio import Redis

    from producer_api.security.keystore import KeyStore
    from shared import redis_options
    from shared.keys import Keys

    async def main() -> str:
        redis = Redis.from_url(redis_options.url(settings), **redis_options.client_kwargs(settings),
                               socket_connect_timeout=5, socket_timeout=10)
        try:
            store = KeyStore(redis, Keys(settings.redis_key_prefix), cache_seconds=0)
            known = read_secret(api_key_file())
            if known is not None and await store.authenticate(known) is not None:
                return known
            await store.revoke(LOCAL_KEY_NAME)
            secret = await store.create(LOCAL_KEY_NAME, ["admin"], LOCAL_KEY_RATE_LIMIT)
            write_secret(api_key_file(), secret)
            return secret
        finally:
            await redis.aclose()

    return asyncio.run(main())


def ensure_flower_password() -> str:
    """Flower's password for :data:`FLOWER_USER`: made once, then read from the state dir."""
    known = read_secret(flower_password_file())
    if known is None:
        known = secrets.token_urlsafe(18)
        write_secret(flower_password_file(), known)
    return known
