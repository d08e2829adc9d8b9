"""A worker process's heartbeat: its loaded models, memory, health (with the reason) and queues, every few s (and,
for a process with an own queue, what the router needs: the models it holds, what one more would cost)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

from shared.keys import WORKER_HEARTBEAT_INTERVAL_S
from shared.stats import StatsWriter
from workers.serving.pool import AdapterPool

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes this process's state now (:meth:`publish`) and from a daemon thread (:meth:`start`)."""

    def __init__(self, stats: StatsWriter, pool: AdapterPool, queues: Sequence[str], member: Any = None) -> None:
        self.stats = stats
        self.pool = pool
        self.queues = ",".join(queues)
        self.member = member
        """A :class:`workers.engines.batching.membership.RoutingMember` when this process has an own queue."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # NOTE: the beat thread and the job thread both publish; each reads what the process holds and writes it
        # under this lock, so an older snapshot never overwrites a newer one in the router's view.
        self._lock = threading.Lock()

    def publish(self) -> None:
        """Loaded models, health and queues of this process, and the cache counters since the last write."""
        with self._lock:
            healthy, reason = self.pool.health()
            self.stats.record([], cache=self.pool.cache_deltas())
            models = self.pool.loaded_models()
            self.stats.heartbeat(models, queues=self.queues, healthy=int(healthy), unhealthy_reason=reason,
                                 pid=os.getpid())
            if self.member is not None:
                self.pool.copies_elsewhere = self.member.publish([m.model_id for m in models],
                                                                 self.pool.placement_cost())

    def cache_changed(self) -> None:
        """A job loaded a model (and the cache maybe evicted others): tell the router now, and leave the rest
        (models list, counters, copies) to the next beat. Nothing to do for a process outside routing."""
        if self.member is None:
            return
        with self._lock:
            held = [m.model_id for m in self.pool.loaded_models()]
            self.member.update(held, self.pool.placement_cost())
            self.pool.copies_elsewhere = self.pool.copies_elsewhere & frozenset(held)

    def _loop(self) -> None:
        while not self._stop.wait(WORKER_HEARTBEAT_INTERVAL_S):
            try:
                self.pool.expire_idle()
                self.publish()
            except Exception:  # a failing heartbeat is logged and retried, never fatal
                log.exception("heartbeat failed")

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._loop, name="fleet-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the live set and routing (best effort: Redis may be gone)."""
        self._stop.set()
        if self._thread is not None:  # a beat in flight would list this process again after it left
            self._thread.join(5)
        if self.member is not None:
            self.member.leave()
        try:
            self.stats.retire()
        except Exception:
            log.warning("could not retire worker %s from Redis", self.stats.worker_id)
