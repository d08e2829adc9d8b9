"""Taking a batch of messages off a pool's queue in one atomic step: the direct engine's fetch.

One Lua call pops up to ``n`` messages (highest-priority list first) and, for each, does what would otherwise
take two more round trips per batch:

* records it as unacknowledged in kombu's own ``unacked`` hash and ``unacked_index`` set (same names, same
  ``[message, exchange, routing key]`` form), so that a worker that dies loses nothing: the message is restored
  after the visibility timeout by this engine's sweep or by any Celery worker's;
* for a predict job, marks its record running (worker, start time, the ``running`` event, as
  :meth:`shared.jobs.JobRecorder.running` writes them) and reads its cancel flag.

Any other job (a load, an unload, a batch job) closes the batch: those run one at a time and take long, so a
process holding two of them would leave the second waiting while another process idles.

A message the script cannot read (not a kombu envelope) is returned as is, untouched, for the consumer to
refuse: an error inside the script would leave the messages popped before it neither queued nor recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from shared.keys import Keys
from shared.tasks import PREDICT

# kombu's Redis transport names (kombu.transport.redis.Channel): sharing them keeps redelivery interoperable.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
UNACKED_MUTEX = "unacked_mutex"

#: KEYS: the queue's priority lists in consume order, then the unacked hash and index.
#: ARGV: max messages, now, worker id, record TTL, job / event / cancel key prefixes, the predict task name,
#: then messages already popped by BRPOP (to record them too).
#: Returns {messages, flags}: per message 1 (cancelled) / 0 (marked running) / -1 (not a predict: untouched).
_FETCH = """
local n, now = tonumber(ARGV[1]), ARGV[2]
local out, flags = {}, {}
-- Records one message; returns false when it is a job other than a predict (load, unload, batch: long, run one
-- at a time), which closes the batch so that the next such job goes to another, idle process.
local function take(m)
  out[#out + 1] = m
  flags[#out] = -1
  local ok, env = pcall(cjson.decode, m)
  local p = ok and type(env) == 'table' and env['properties']
  if type(p) ~= 'table' or type(p['delivery_tag']) ~= 'string' then return true end
  local d = type(p['delivery_info']) == 'table' and p['delivery_info'] or {}
  redis.call('ZADD', KEYS[#KEYS], now, p['delivery_tag'])
  redis.call('HSET', KEYS[#KEYS - 1], p['delivery_tag'],
             '[' .. m .. ',' .. cjson.encode(d['exchange'] or '') .. ',' .. cjson.encode(d['routing_key'] or '') .. ']')
  local h = type(env['headers']) == 'table' and env['headers'] or {}
  local id = h['id']
  if h['task'] ~= ARGV[8] then return false end
  if type(id) == 'string' then
    local key = ARGV[5] .. id
    redis.call('HSET', key, 'status', 'running', 'worker', ARGV[3], 'started_at', now)
    redis.call('EXPIRE', key, ARGV[4])
    redis.call('PUBLISH', ARGV[6] .. id, '{"job_id": ' .. cjson.encode(id) .. ', "status": "running", "ts": ' .. now .. '}')
    flags[#out] = redis.call('EXISTS', ARGV[7] .. id)
  end
  return true
end
local open = true
for i = 9, #ARGV do open = take(ARGV[i]) and open end
for i = 1, #KEYS - 2 do
  while open and #out < n do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    open = take(m)
  end
end
return {out, flags}
"""


@dataclass
class Fetched:
    """One batch: the raw messages, when they were taken, and per message its cancel flag (predict jobs,
    already marked running) or None (any other message, untouched)."""

    raws: list[bytes]
    started_at: float
    cancelled: list[bool | None]


class BatchFetcher:
    """Fetches batches from one queue's lists for one worker process."""

    def __init__(self, redis: Any, lists: Sequence[str], keys: Keys, worker_id: str, record_ttl: int,
                 max_messages: int) -> None:
        self.redis = redis
        self.keys = [*lists, UNACKED, UNACKED_INDEX]
        self.lists = list(lists)
        self.args = [worker_id, record_ttl, keys.job(""), keys.job_events(""), keys.job_cancelled(""), PREDICT]
        self.max_messages = max_messages
        self._script = redis.register_script(_FETCH)

    def _run(self, popped: Sequence[bytes] = ()) -> Fetched:
        now = time.time()
        raws, flags = self._script(keys=self.keys, args=[self.max_messages, now, *self.args, *popped])
        return Fetched(list(raws), now, [None if f < 0 else bool(f) for f in flags])

    def fetch(self, block_s: float = 1.0) -> Fetched:
        """Up to ``max_messages`` messages; waits up to ``block_s`` for the first when the queue is empty."""
        batch = self._run()
        if batch.raws or block_s <= 0:
            return batch
        popped = self.redis.brpop(self.lists, timeout=block_s)  # wakes as soon as a message arrives
        # NOTE: between this BRPOP and the script the message is in neither the queue nor the unacked hash; a
        # worker killed in that instant loses it (kombu's own BRPOP consumer has the same window).
        return self._run([popped[1]]) if popped is not None else batch
