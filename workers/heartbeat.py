"""A worker process's heartbeat: its loaded models, memory, health (with the reason) and queues, every few s."""

from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

from shared.keys import WORKER_HEARTBEAT_INTERVAL_S
from shared.stats import StatsWriter
from workers.serving.pool import AdapterPool

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes this process's state now (:meth:`publish`) and from a daemon thread (:meth:`start`)."""

    def __init__(self, stats: StatsWriter, pool: AdapterPool, queues: Sequence[str]) -> None:
        self.stats = stats
        self.pool = pool
        self.queues = ",".join(queues)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Loaded models, health and queues of this process, and the cache counters since the last write."""
        healthy, reason = self.pool.health()
        self.stats.record([], cache=self.pool.cache_deltas())
        self.stats.heartbeat(self.pool.loaded_models(), queues=self.queues, healthy=int(healthy),
                             unhealthy_reason=reason, pid=os.getpid())

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
        """Stop beating and leave the live set (best effort: Redis may be gone)."""
        self._stop.set()
        try:
            self.stats.retire()
        except Exception:
            log.warning("could not retire worker %s from Redis", self.stats.worker_id)
