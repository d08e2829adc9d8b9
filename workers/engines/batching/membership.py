"""A consumer process's part in cache-aware routing: what it tells the router, and leaving.

The router (:class:`shared.routing.JobRouter`) reads, per pool, which processes consume an own queue and what
loading a new model costs each (``Keys.routing_members``), and per model which processes hold it
(``Keys.model_holders``). Each consumer writes only its own entries, after every change of what it holds and
with every heartbeat; when it stops, its own queue goes back to the pool queue (:meth:`RoutingMember.leave`),
as it does when it dies (its supervisor) or its host does (the reaper).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from shared.keys import MODEL_HOLDERS_TTL_S, Keys
from shared.routing import JobRouter

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RoutingMember:
    """One consumer process of one pool queue, as the router sees it."""

    def __init__(self, redis: Any, keys: Keys, worker_id: str, queue: str, router: JobRouter) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.queue = queue
        self.router = router
        self._published: set[str] = set()

    @property
    def lists(self) -> list[str]:
        """This process's own queue, one list per priority step (served before the pool's of the same step)."""
        from shared.routing import redis_list_keys

        return redis_list_keys(self.keys.worker_queue(self.worker_id))

    def _write(self, pipe: Any, add: Iterable[str], drop: Iterable[str], cost: float) -> None:
        """Into ``pipe``: hold ``add`` (renewing their TTL), no longer ``drop``, cost ``cost``."""
        for model_id in sorted(add):
            key = self.keys.model_holders(self.queue, model_id)
            pipe.sadd(key, self.worker_id)
            pipe.expire(key, MODEL_HOLDERS_TTL_S)
        for model_id in sorted(drop):
            pipe.srem(self.keys.model_holders(self.queue, model_id), self.worker_id)
        pipe.zadd(self.keys.routing_members(self.queue), {self.worker_id: cost})

    def publish(self, model_ids: Iterable[str], cost: float) -> frozenset[str]:
        """Hold ``model_ids`` (and no others) and cost ``cost`` to load one more model (one MULTI); returns those
        of ``model_ids`` that other processes in routing hold too (copies)."""
        held = sorted(set(model_ids))
        pipe = self.redis.pipeline(transaction=True)
        self._write(pipe, held, self._published - set(held), cost)
        for model_id in held:
            pipe.smembers(self.keys.model_holders(self.queue, model_id))
        pipe.zrange(self.keys.routing_members(self.queue), 0, -1)
        replies = pipe.execute()
        self._published = set(held)
        members = {_text(m) for m in replies[-1]} - {self.worker_id}
        holders = replies[len(replies) - 1 - len(held):-1]
        return frozenset(m for m, found in zip(held, holders) if members & {_text(h) for h in found})

    def update(self, model_ids: Iterable[str], cost: float) -> None:
        """What changed since the last publish, alone (one MULTI): holding the models that came in, no longer the
        ones that went, and the new cost. After a predict's cold load, where the full :meth:`publish` (every
        holding again, with its holders read back) would cost the job more than the load itself did."""
        held = set(model_ids)
        pipe = self.redis.pipeline(transaction=True)
        self._write(pipe, held - self._published, self._published - held, cost)
        pipe.execute()
        self._published = held

    def busiest(self, at_least: int) -> tuple[list[str], int] | None:
        """The own lists of the other process in routing with the most jobs waiting (at least ``at_least``), and
        how many wait there; None when no one has that many."""
        from shared.routing import redis_list_keys

        others = [_text(m) for m in self.redis.zrange(self.keys.routing_members(self.queue), 0, -1)]
        others = [m for m in others if m != self.worker_id]
        if not others:
            return None
        lists = {m: redis_list_keys(self.keys.worker_queue(m)) for m in others}
        pipe = self.redis.pipeline(transaction=False)
        for m in others:
            for key in lists[m]:
                pipe.llen(key)
        lengths = pipe.execute()
        steps = len(lists[others[0]])
        waiting = {m: sum(lengths[i * steps:(i + 1) * steps]) for i, m in enumerate(others)}
        victim = max(others, key=lambda m: waiting[m])
        return (lists[victim], waiting[victim]) if waiting[victim] >= at_least else None

    def leave(self) -> int:
        """Stop being routed to: drop the holdings, give the own queue back to the pool queue (returns how many
        messages went back). Best effort: with Redis away, the supervisor or the reaper does it later."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for model_id in self._published:
                pipe.srem(self.keys.model_holders(self.queue, model_id), self.worker_id)
            pipe.execute()
            self._published = set()
            return self.router.retire(self.redis, self.worker_id, self.queue)
        except Exception as exc:
            log.warning("could not leave routing of %s: %s", self.queue, exc)
            return 0
