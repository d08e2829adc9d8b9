"""Acknowledging messages, and giving unacknowledged ones back to their queue.

Three ways a message goes back: its process died (its supervisor gives back what the process held, at once), its
whole worker went (the reaper, :mod:`workers.reaper`, gives back what it held once its heartbeats stopped), or
its holder is unknown (the visibility sweep gives back what nobody acknowledged within the timeout). Both use one
primitive, :data:`_GIVE_BACK`, which moves a message only if it is still unacknowledged, so the two can never
deliver it twice. A message goes back to the head of its queue: it was first in line once already.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Sequence

from shared import routing
from shared.keys import Keys
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX, UNACKED_MUTEX

log = logging.getLogger(__name__)

#: KEYS: unacked hash, its index, the holder's hash, the message's queue list. ARGV: tag, message, the fetch time
#: the caller saw. NOTE: the fetch time tells deliveries of one tag apart: a message given back and taken again
#: meanwhile (by another sweep, or after its first holder was swept) is another delivery, and is left alone.
_GIVE_BACK = """
redis.call('HDEL', KEYS[3], ARGV[1])
if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1])) ~= tonumber(ARGV[3]) then return 0 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[2])
return 1
"""


def ack(pipe: Any, held_key: str, tags: Sequence[str]) -> None:
    """Queue the acknowledgement of ``tags`` on ``pipe`` (the MULTI that stores their outcomes)."""
    if tags:
        pipe.zrem(UNACKED_INDEX, *tags)
        pipe.hdel(UNACKED, *tags)
        pipe.hdel(held_key, *tags)


class Redelivery:
    """Gives messages back to their queues, for one fleet key prefix."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._give_back = redis.register_script(_GIVE_BACK)

    def _back(self, tag: str, raw: bytes | None, held_key: str, fetched_at: float | str) -> bool:
        if raw is None:  # acknowledged meanwhile, or an index entry without its message
            self.redis.pipeline().zrem(UNACKED_INDEX, tag).hdel(held_key, tag).execute()
            return False
        try:
            payload, _exchange, routing_key = json.loads(raw)
            payload.setdefault("headers", {})["redelivered"] = True
            priority = (payload.get("properties") or {}).get("priority") or 0
            target = routing.priority_list(routing_key, priority)
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("unacknowledged message %s is unreadable (%s); dropped from the unacked set", tag, exc)
            self.redis.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).hdel(held_key, tag).execute()
            return False
        return bool(self._give_back(keys=[UNACKED, UNACKED_INDEX, held_key, target],
                                    args=[tag, json.dumps(payload), repr(float(fetched_at))]))

    def holdings(self, worker_id: str) -> dict[str, tuple[str, str, str]]:
        """Delivery tag -> (job id, task name, fetch time) of what a process holds now."""
        raw = self.redis.hgetall(self.keys.worker_deliveries(worker_id))
        return {k.decode(): tuple((v.decode().split(" ", 2) + ["", ""])[:3]) for k, v in raw.items()}

    def held(self, worker_id: str) -> dict[str, tuple[str, str]]:
        """Delivery tag -> (job id, task name) of what a process holds now."""
        return {tag: (job_id, task) for tag, (job_id, task, _) in self.holdings(worker_id).items()}

    def give_back_held(self, worker_id: str) -> int:
        """Give back every message a (dead) process held; returns how many went back."""
        held_key = self.keys.worker_deliveries(worker_id)
        held = self.holdings(worker_id)
        tags = list(held)
        raws = self.redis.hmget(UNACKED, tags) if tags else []
        restored = sum(self._back(tag, raw, held_key, held[tag][2] or "nan") for tag, raw in zip(tags, raws))
        self.redis.pipeline().delete(held_key).srem(self.keys.delivery_holders(), worker_id).execute()
        if restored:
            log.warning("gave back %d message(s) held by %s", restored, worker_id)
        return restored

    def sweep(self, visibility_timeout: float, spare: frozenset[str] = frozenset()) -> int:
        """Give back messages nobody acknowledged within the visibility timeout, but those in ``spare`` (held by
        live workers: however long their jobs run, they are not taken from them)."""
        lock = str(uuid.uuid4())
        if not self.redis.set(UNACKED_MUTEX, lock, nx=True, ex=300):
            return 0  # another consumer (or a Celery worker) is sweeping
        restored = 0
        try:
            ceiling = time.time() - visibility_timeout
            due = [(t.decode(), score) for t, score in
                   self.redis.zrangebyscore(UNACKED_INDEX, "-inf", ceiling, withscores=True)
                   if t.decode() not in spare]
            raws = self.redis.hmget(UNACKED, [t for t, _ in due]) if due else []
            # NOTE: the holder is unknown here; its holdings entry stays, and is harmless: the fetch time in it no
            # longer matches once the message is taken again, so its supervisor never gives that delivery back.
            restored = sum(self._back(tag, raw, self.keys.worker_deliveries("unknown"), score)
                           for (tag, score), raw in zip(due, raws))
        finally:
            if self.redis.get(UNACKED_MUTEX) == lock.encode():
                self.redis.delete(UNACKED_MUTEX)
        if restored:
            log.warning("restored %d unacknowledged message(s) of lost workers", restored)
        return restored
