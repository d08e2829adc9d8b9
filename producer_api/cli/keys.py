"""``fleet keys``: make, list and revoke API keys, straight on the fleet's Redis (no API needed: this is how
the first key of a fleet is made)."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any, Awaitable, Callable, TypeVar

import click
from rich.console import Console
from rich.table import Table

from producer_api.security.principal import SCOPES

console = Console()
T = TypeVar("T")


def _run(action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(store)`` on a :class:`KeyStore` over the configured Redis; fleet errors become CLI errors."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from producer_api.security.keystore import KeyStore
    from shared import redis_options
    from shared.errors import FleetError
    from shared.keys import Keys
    from shared.settings import get_settings

    settings = get_settings()

    async def main() -> T:
        redis = Redis.from_url(redis_options.url(settings), **redis_options.client_kwargs(settings),
                               socket_connect_timeout=5, socket_timeout=10)
        try:
            return await action(KeyStore(redis, Keys(settings.redis_key_prefix), cache_seconds=0))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except FleetError as exc:
        raise click.ClickException(exc.message) from None
    except RedisError as exc:
        raise click.ClickException(f"cannot reach Redis at {settings.redis_url}: {exc}") from None


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds") if ts else "-"


@click.group()
def keys() -> None:
    """API keys: every /v1 route needs one (X-API-Key or Authorization: Bearer)."""


@keys.command()
@click.argument("name")
@click.option("--scopes", default="submit,read", show_default=True,
              help=f"Comma-separated, of: {', '.join(SCOPES)} (admin implies the others).")
@click.option("--rate-limit", default=None, help="This key's own limit, e.g. 1000/minute (API_RATE_LIMIT otherwise).")
def create(name: str, scopes: str, rate_limit: str | None) -> None:
    """Make a key; its secret is printed once, alone on the last line (only its hash is stored)."""
    secret = _run(lambda store: store.create(name, scopes.split(","), rate_limit))
    console.print(f"Created API key {name!r} with scopes {scopes}. Keep it now: it is not shown again.",
                  highlight=False)
    click.echo(secret)


@keys.command(name="list")
def list_keys() -> None:
    """Every key: name, scopes, rate limit, created and last used (never the secret)."""
    found = _run(lambda store: store.list())
    table = Table("name", "scopes", "rate limit", "created", "last used", "source")
    for key in found:
        table.add_row(key.name, ",".join(key.scopes), key.rate_limit or "default", _when(key.created_at),
                      _when(key.last_used_at), key.source)
    console.print(table)


@keys.command()
@click.argument("name")
def revoke(name: str) -> None:
    """Delete a key; API processes stop accepting it within API_KEY_CACHE_SECONDS."""
    if not _run(lambda store: store.revoke(name)):
        raise click.ClickException(f"no stored key named {name!r} (static keys are removed from API_KEYS_FILE)")
    console.print(f"Revoked API key {name!r}.", highlight=False)
