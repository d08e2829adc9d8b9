"""What a Celery worker's main process holds, for the reaper (:mod:`workers.reaper`).

Celery's main process reserves messages for its pool (prefetch) and acknowledges them after their task
(``acks_late``); kombu keeps them in its ``unacked`` hash meanwhile. That alone leaves a lost worker's messages to
the visibility timeout. So the main process also records each one it receives as held by ``<node>|main``, with
the fetch time kombu gave it (so that only that delivery is ever given back), clears it when it acknowledges or
rejects, and runs the reaper for the rest of the fleet.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shared.keys import Keys
from workers.engines.batching.fetch import UNACKED_INDEX

log = logging.getLogger(__name__)

#: KEYS: unacked index, holder's hash. ARGV: tag, "job_id task". Recorded with kombu's own fetch time.
_HOLD = """
local fetched = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not fetched then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. fetched)
return 1
"""


class MainProcessHoldings:
    """The holdings of one Celery worker node's main process, and its reaper thread."""

    def __init__(self, redis: Any, keys: Keys, node: str, lost_after_s: float,
                 visibility_timeout_s: float | None = None) -> None:
        from workers.reaper import REAP_INTERVAL_S, Reaper

        self.redis = redis
        self.keys = keys
        self.holder = f"{node}|main"
        self.held_key = keys.worker_deliveries(self.holder)
        self._hold = redis.register_script(_HOLD)
        self.reaper = Reaper(redis, keys, lost_after_s, visibility_timeout_s=visibility_timeout_s)
        self._interval = REAP_INTERVAL_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, tag: str, job_id: str, task: str) -> None:
        self._hold(keys=[UNACKED_INDEX, self.held_key], args=[tag, f"{job_id} {task}"])

    def release(self, tag: str) -> None:
        self.redis.hdel(self.held_key, tag)

    def start(self) -> None:
        self.redis.sadd(self.keys.delivery_holders(), self.holder)
        self._thread = threading.Thread(target=self._loop, name="fleet-reaper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval / 2):
            self.reaper.maybe_run()

    def stop(self) -> None:
        self._stop.set()


_current: MainProcessHoldings | None = None


def start(node: str) -> None:
    """Begin recording (and reaping) for this main process; called once the worker is ready."""
    global _current
    from shared.settings import get_settings
    from workers.process import redis_client

    settings = get_settings()
    _current = MainProcessHoldings(redis_client(settings), Keys(settings.redis_key_prefix), node,
                                   settings.worker_lost_after_seconds, 2 * settings.job_time_limit_seconds)
    _current.start()


def stop() -> None:
    if _current is not None:
        _current.stop()


def _safely(action: str, fn: Any, *args: Any) -> None:
    # NOTE: bookkeeping for the reaper must never fail a job or the consumer: at worst a lost worker's message
    # waits for the visibility timeout, as it would without it.
    if _current is None:
        return
    try:
        fn(*args)
    except Exception as exc:
        log.warning("could not %s a delivery for the reaper: %s", action, exc)


def hold(tag: str | None, job_id: str, task: str) -> None:
    if tag:
        _safely("record", _current.hold if _current else None, tag, job_id, task)


def release(tag: str | None) -> None:
    if tag:
        _safely("release", _current.release if _current else None, tag)
