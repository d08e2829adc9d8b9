"""Taking a batch of messages off a pool's queue in one atomic step: the batching engine's fetch.

One Lua call pops up to ``n`` messages (highest-priority list first) and, for each, does what would otherwise
take more round trips per batch:

* records it as unacknowledged in kombu's own ``unacked`` hash and ``unacked_index`` set (same names, same
  ``[message, exchange, routing key]`` form), so that nothing is lost when a whole host goes: the message is
  restored after the visibility timeout by this engine's sweep or by any Celery worker's;
* records it as held by this process (``Keys.worker_deliveries``: job id, task, fetch time), so that when only
  the process dies its supervisor gives the message back at once;
* begins its job (:data:`workers.executor.begin.BEGIN_LUA`, the same function the Celery engine runs):
  counts the delivery, reads the cancel flag, marks the record running.

Any job other than a predict (a load, an unload, a batch job) closes the batch: those take long, so a process
holding two of them would leave the second waiting while another process idles.

A message the script cannot read (not a kombu envelope) is returned as is, unrecorded, for the consumer to
refuse: an error inside the script would leave the messages popped before it neither queued nor recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import redis as redis_lib

from shared.keys import Keys
from shared.tasks import PREDICT
from workers.executor.begin import BEGIN_LUA, begin_args, parse_begun
from workers.executor.delivery import Begun

# kombu's Redis transport names (kombu.transport.redis.Channel): sharing them keeps redelivery interoperable.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
UNACKED_MUTEX = "unacked_mutex"
#: Share of a batch the process's own queue gives while the pool queue has jobs waiting too.
OWN_SHARE = 0.75
#: Seconds one blocking peek waits before it checks whether it should still wait (and whether to stop).
PEEK_TIMEOUT_S = 1.0

log = logging.getLogger(__name__)

#: KEYS: the process's own lists (none, or one per priority step), the pool queue's priority lists in consume
#: order, then the unacked hash, its index, this process's holdings.
#: ARGV: max messages, now, the predict task name, begin's five constants, how many own lists, the most messages
#: the own lists give before the pool's have had their turn.
#: Returns {messages, begun}: per message three numbers (begin's reply), or {-1, 0, 0} when it was not begun.
_FETCH = BEGIN_LUA + """
local n, now = tonumber(ARGV[1]), ARGV[2]
local c = {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]}
local k, cap = tonumber(ARGV[9]), tonumber(ARGV[10])
local unacked, index, held = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local out, begun = {}, {}
-- Records and begins one message; returns false when it closes the batch (any job but a predict).
local function take(m)
  out[#out + 1] = m
  local ok, env = pcall(cjson.decode, m)
  local p = ok and type(env) == 'table' and env['properties']
  local h = ok and type(env) == 'table' and type(env['headers']) == 'table' and env['headers'] or {}
  if type(p) ~= 'table' or type(p['delivery_tag']) ~= 'string' or type(h['id']) ~= 'string' then
    begun[#out] = {-1, 0, 0}
    return true
  end
  local d = type(p['delivery_info']) == 'table' and p['delivery_info'] or {}
  local tag = p['delivery_tag']
  redis.call('ZADD', index, now, tag)
  redis.call('HSET', unacked, tag,
             '[' .. m .. ',' .. cjson.encode(d['exchange'] or '') .. ',' .. cjson.encode(d['routing_key'] or '') .. ']')
  redis.call('HSET', held, tag, h['id'] .. ' ' .. tostring(h['task']) .. ' ' .. now)
  begun[#out] = begin(h['id'], now, c)
  return h['task'] == ARGV[3]
end
local open = true
local function drain(key, limit)
  while open and #out < limit do
    local m = redis.call('RPOP', key)
    if not m then break end
    open = take(m)
  end
end
-- Priority step by step, the own list before the pool's; the own lists give at most `cap` messages until the
-- pool's lists had their turn, so jobs no holder could take are never starved by routed ones.
local own = 0
for i = 1, #KEYS - 3 - k do
  if i <= k then
    local before = #out
    drain(KEYS[i], math.min(n, #out + cap - own))
    own = own + #out - before
  end
  drain(KEYS[k + i], n)
end
for i = 1, k do drain(KEYS[i], n) end
return {out, begun}
"""


@dataclass
class Fetched:
    """One batch: the raw messages, when they were taken, and per message what beginning its job found (None
    for a message the script could not read)."""

    raws: list[bytes]
    started_at: float
    begun: list[Begun | None]


class Waker:
    """Waits until a message is on any of a queue's lists, without taking it.

    ``BLMOVE l l RIGHT RIGHT`` blocks until ``l`` is non-empty and then moves its last element onto its own end:
    a no-op, atomically, so it is a blocking peek. A message is therefore never out of Redis between the wait and
    the fetch script that takes it (a BRPOP would hold it in this process alone, and a process killed in that
    instant would lose it). One thread per list, each on its own connection (BLMOVE watches one key); they peek
    only while the consumer waits, so a busy consumer's queue does not spin them. Peeking is level-triggered:
    a message that arrived just before :meth:`wait` wakes it at once.
    """

    def __init__(self, redis: Any, lists: Sequence[str]) -> None:
        self._ready = threading.Event()
        self._armed = threading.Event()
        self._stop = threading.Event()
        pool = redis.connection_pool
        self._threads = [threading.Thread(target=self._watch, args=(redis_lib.Redis(connection_pool=pool), key),
                                          name=f"fleet-waker-{i}", daemon=True) for i, key in enumerate(lists)]
        for thread in self._threads:
            thread.start()

    def _watch(self, client: Any, key: str) -> None:
        while not self._stop.is_set():
            if not self._armed.wait(1.0):
                continue
            try:
                found = client.blmove(key, key, PEEK_TIMEOUT_S, "RIGHT", "RIGHT")
            except Exception as exc:  # Redis away: the consumer's own loop reports it; try again shortly
                log.debug("waiting on %s failed: %s", key, exc)
                self._stop.wait(1.0)
                continue
            if found is not None:
                self._armed.clear()
                self._ready.set()

    def wait(self, timeout: float) -> bool:
        """True as soon as some list holds a message; False after ``timeout``."""
        self._ready.clear()
        self._armed.set()
        try:
            return self._ready.wait(timeout)
        finally:
            self._armed.clear()

    def stop(self) -> None:
        self._stop.set()
        self._armed.set()


class BatchFetcher:
    """Fetches batches from one queue's lists (and the process's own lists, when it has some) for one process.

    ``own_lists`` are the process's own queue, one list per priority step as the pool's: routed jobs of a step
    come before the pool's of that step, but give at most :data:`OWN_SHARE` of a batch while the pool's wait.
    """

    def __init__(self, redis: Any, lists: Sequence[str], keys: Keys, worker_id: str, record_ttl: int,
                 max_messages: int, own_lists: Sequence[str] = ()) -> None:
        if own_lists and len(own_lists) != len(lists):
            raise ValueError("own lists must mirror the pool queue's priority lists")
        self.redis = redis
        self.lists = [*own_lists, *lists]
        self.keys = [*own_lists, *lists, UNACKED, UNACKED_INDEX, keys.worker_deliveries(worker_id)]
        own_cap = max(1, int(max_messages * OWN_SHARE)) if max_messages > 1 else 1
        self.args = [PREDICT, *begin_args(keys, worker_id, record_ttl), len(own_lists), own_cap]
        self.max_messages = max_messages
        self._script = redis.register_script(_FETCH)
        self._waker: Waker | None = None

    def _run(self, keys: Sequence[str] | None = None, args: Sequence[Any] | None = None,
             max_messages: int | None = None) -> Fetched:
        now = time.time()
        raws, begun = self._script(keys=keys or self.keys,
                                   args=[max_messages or self.max_messages, repr(now), *(args or self.args)])
        return Fetched(list(raws), now, [None if int(b[0]) < 0 else parse_begun(b, now) for b in begun])

    def steal(self, lists: Sequence[str], max_messages: int) -> Fetched:
        """Up to ``max_messages`` from another process's own queue (its lists in priority order), recorded and
        begun as this process's own fetch: an idle process takes work a busy one has waiting."""
        keys = [*lists, *self.keys[-3:]]
        return self._run(keys, [*self.args[:-2], 0, max_messages], max_messages)

    def fetch(self, block_s: float = 1.0) -> Fetched:
        """Up to ``max_messages`` messages; waits up to ``block_s`` for the first when the queue is empty."""
        batch = self._run()
        if batch.raws or block_s <= 0:
            return batch
        if self._waker is None:
            self._waker = Waker(self.redis, self.lists)
        return self._run() if self._waker.wait(block_s) else batch

    def close(self) -> None:
        if self._waker is not None:
            self._waker.stop()
