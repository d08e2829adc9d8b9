"""The reaper: what a lost worker held goes back to its queues within ``WORKER_LOST_AFTER_SECONDS``.

Every process that takes messages off a queue records what it holds (``Keys.worker_deliveries``, from the fetch
to the ack) and lists itself in ``Keys.delivery_holders``: a batching-engine consumer under its own id, a Celery
worker's main process (which reserves messages for its pool) as ``<node>|main``. A process that dies alone is
handled by its own supervisor at once (the batching supervisor, Celery's pool). A whole worker that vanishes —
its host preempted, its pod killed — leaves no one behind to do it; the reaper, run by every live worker but by
one at a time (a Redis lock), sees that no process of the holder's node has heart-beaten for
``WORKER_LOST_AFTER_SECONDS`` and gives its deliveries, and the jobs routed to its own queues, back to the head of
their pool queues, the same way a
supervisor does (:class:`workers.engines.batching.redelivery.Redelivery`: only a delivery still unacknowledged
and still the one the holder took goes back). The visibility timeout stays as the last resort for deliveries
whose holder is unknown.

A live node is never reaped, however long its jobs run: its processes beat from a thread. The same reaper runs
the last-resort sweep (deliveries unacknowledged for the visibility timeout whose holder is unknown), sparing
what live workers hold, so a pool with a shorter time limit never takes a longer job from another pool.

A reaper that just came back from a Redis outage waits until its own heartbeat has had time to show (everyone's
heartbeats stopped during the outage; they resume within a heartbeat interval).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from shared import routing
from shared.keys import WORKER_HEARTBEAT_INTERVAL_S, Keys
from workers.engines.batching.redelivery import Redelivery

log = logging.getLogger(__name__)

#: Seconds between two reaper rounds of one process.
REAP_INTERVAL_S = 5.0
#: Seconds the reaper lock is held at most (a reaper that dies mid-round frees it so).
LOCK_TTL_S = 30


def node_of(holder: str) -> str:
    """The worker node of a holder or heartbeat id (``<node>|<pid>`` or ``<node>|main``)."""
    return holder.rsplit("|", 1)[0]


class Reaper:
    """Reaps lost workers for one fleet prefix; call :meth:`maybe_run` from a worker's loop.

    Args:
        redis: A sync Redis client.
        keys: Fleet key names.
        lost_after_s: ``WORKER_LOST_AFTER_SECONDS``.
    """

    def __init__(self, redis: Any, keys: Keys, lost_after_s: float, visibility_timeout_s: float | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.lost_after_s = lost_after_s
        self.visibility_timeout_s = visibility_timeout_s
        self.redelivery = Redelivery(redis, keys)
        self.router = routing.JobRouter(keys)
        self._next = 0.0
        self._next_sweep = 0.0
        self._up_since: float | None = None

    def maybe_run(self) -> int:
        """One round when one is due (never raises: a failing round is logged and retried); messages given back."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + REAP_INTERVAL_S
        try:
            restored = self.run_once()
        except Exception as exc:
            self._up_since = None  # Redis trouble: after it, heartbeats need time to show again
            log.warning("reaping lost workers failed (%s); retrying", exc)
            return 0
        return restored

    def run_once(self) -> int:
        """Give back what every lost holder held; returns how many messages went back."""
        now = time.monotonic()
        if self._up_since is None:
            self._up_since = now
        # NOTE: heartbeats stop fleet-wide while Redis is away; right after it is back every node looks lost
        # until it beats again. Judge only once both this reaper and Redis itself have been up for longer than a
        # node may be silent (a Redis restart this reaper never saw fail counts too).
        settle = WORKER_HEARTBEAT_INTERVAL_S * 2
        if now - self._up_since < settle or self._redis_uptime() < self.lost_after_s + settle:
            return 0
        holders = [h.decode() if isinstance(h, bytes) else h for h in self.redis.smembers(self.keys.delivery_holders())]
        members = self._routing_members()
        sweep_due = self.visibility_timeout_s is not None and now >= self._next_sweep
        if not holders and not members and not sweep_due:
            return 0
        token = str(uuid.uuid4())
        if not self.redis.set(self.keys.reaper_lock(), token, nx=True, ex=LOCK_TTL_S):
            return 0
        try:
            alive = self._live_nodes()
            restored = 0
            # Out of routing first, and what waited in their own queues back to the pool queue.
            for member, queue in members:
                if node_of(member) not in alive:
                    back = self.router.retire(self.redis, member, queue)
                    if back:
                        log.warning("worker node %s is lost: %d job(s) routed to %s went back to %s",
                                    node_of(member), back, member, queue)
                    restored += back
            for holder in holders:
                if node_of(holder) in alive:
                    continue
                back = self.redelivery.give_back_held(holder)  # it also drops the holder from the set
                if back:
                    log.warning("worker node %s is lost (no heartbeat for %.0f s): %d delivery(ies) of %s went back",
                                node_of(holder), self.lost_after_s, back, holder)
                restored += back
            if sweep_due:
                restored += self._sweep(holders, alive)
            return restored
        finally:
            if self.redis.get(self.keys.reaper_lock()) == token.encode():
                self.redis.delete(self.keys.reaper_lock())

    def _sweep(self, holders: list[str], alive: set[str]) -> int:
        """The last resort: deliveries nobody holds (or whose holder was never recorded) go back after the
        visibility timeout; what live workers hold is spared, however long it runs."""
        assert self.visibility_timeout_s is not None
        self._next_sweep = time.monotonic() + max(REAP_INTERVAL_S, self.visibility_timeout_s / 4)
        live = [h for h in holders if node_of(h) in alive]
        pipe = self.redis.pipeline(transaction=False)
        for holder in live:
            pipe.hkeys(self.keys.worker_deliveries(holder))
        spare = frozenset(t.decode() if isinstance(t, bytes) else t for tags in pipe.execute() for t in tags)
        return self.redelivery.sweep(self.visibility_timeout_s, spare)

    def _routing_members(self) -> list[tuple[str, str]]:
        """``(process, pool queue)`` of every process routing knows, in every pool."""
        queues = [q.name for q in routing.all_queues()]
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrange(self.keys.routing_members(queue), 0, -1)
        return [(m.decode() if isinstance(m, bytes) else m, queue)
                for queue, found in zip(queues, pipe.execute()) for m in found]

    def _redis_uptime(self) -> float:
        """Seconds Redis has been up (``INFO server``); infinity where INFO is not allowed (managed Redis)."""
        try:
            return float(self.redis.info("server")["uptime_in_seconds"])
        except Exception:
            return float("inf")

    def _live_nodes(self) -> set[str]:
        ids = self.redis.zrangebyscore(self.keys.workers(), time.time() - self.lost_after_s, "+inf")
        return {node_of(i.decode() if isinstance(i, bytes) else i) for i in ids}
