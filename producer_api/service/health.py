"""Readiness, transport-neutral: ``/readyz``, ``/v2/health/ready`` and gRPC ``ServerReady`` ask the same."""

from __future__ import annotations

from producer_api import fleetview
from producer_api.context import ApiContext
from producer_api.errors import NotReadyError
from shared import routing


async def readiness(c: ApiContext) -> dict[str, int]:
    """Live workers per configured pool queue (``POOLS``) when Redis answers and every pool has one.

    Raises:
        NotReadyError: a pool has no live worker (each one named, with its workers' health reasons), or ``POOLS``
            is invalid (503).
        redis.exceptions.ConnectionError: Redis is unreachable (503 through the error middleware).
    """
    await c.redis.ping()
    try:
        required = routing.pools_from_spec(c.settings.pools)
    except ValueError as exc:
        raise NotReadyError(f"POOLS is invalid: {exc}", field="pools") from None
    by_queue, unhealthy = await fleetview.workers_by_queue(c.redis, c.keys)
    missing = [queue for queue in required if not by_queue.get(queue)]
    if missing:
        why = [f"{queue}: " + ("; ".join(f"{w} unhealthy: {r}" for w, r in unhealthy[queue].items())
                               if unhealthy.get(queue) else "no live worker")
               for queue in missing]
        raise NotReadyError(f"pools not ready: {' | '.join(why)}", field="pools")
    return {queue: len(by_queue[queue]) for queue in required}
