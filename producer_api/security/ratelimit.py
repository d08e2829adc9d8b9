"""Per-key rate limits with the ``limits`` library, counted in Redis so that every API replica shares them.

A key's requests count against one bucket: its own limit when it has one (``fleet keys create --rate-limit``),
else the route scope's override (``API_RATE_LIMITS``) in a bucket of that scope, else ``API_RATE_LIMIT``. The
sliding-window counter costs one Lua call per request and two counters per bucket, whatever the limit.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from producer_api.security.principal import Principal
from shared.errors import RateLimitedError


@lru_cache(maxsize=256)
def _item(limit: str) -> RateLimitItem:
    return parse(limit)


class RateLimits:
    """The limiter of one API process.

    Args:
        redis: The API's asyncio Redis client; the limiter shares its connection pool.
        prefix: Prefix of the counters' keys (``Keys.rate_limits()``).
        default: ``API_RATE_LIMIT``.
        per_scope: ``API_RATE_LIMITS``: scope -> limit.
    """

    def __init__(self, redis: Any, prefix: str, default: str, per_scope: dict[str, str]) -> None:
        storage = RedisStorage("async+redis://", implementation="redispy", key_prefix=prefix,
                               connection_pool=redis.connection_pool)
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self.default = default
        self.per_scope = dict(per_scope)
        for limit in (default, *per_scope.values()):
            _item(limit)  # a bad limit fails at start-up, not on the first request

    def _bucket(self, principal: Principal, scope: str) -> tuple[str, str]:
        if principal.rate_limit:
            return principal.rate_limit, "key"
        if scope in self.per_scope:
            return self.per_scope[scope], scope
        return self.default, "all"

    async def hit(self, principal: Principal, scope: str) -> None:
        """Count one request of ``principal`` on a ``scope`` route.

        Raises:
            RateLimitedError: the bucket is full (429 with ``Retry-After`` and the ``RateLimit-*`` headers).
        """
        limit, bucket = self._bucket(principal, scope)
        item = _item(limit)
        if await self._limiter.hit(item, principal.name, bucket):
            return
        stats = await self._limiter.get_window_stats(item, principal.name, bucket)
        raise RateLimitedError(
            f"API key {principal.name!r} is over its rate limit of {limit}; retry later",
            limit=item.amount, remaining=stats.remaining, reset_after_s=stats.reset_time - time.time())
