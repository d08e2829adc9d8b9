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

import time
from dataclasses import dataclass
from typing import Any, Sequence

from shared.keys import Keys
from shared.tasks import PREDICT
from workers.executor.begin import BEGIN_LUA, begin_args, parse_begun
from workers.executor.delivery import Begun

# kombu's Redis transport names (kombu.transport.redis.Channel): sharing them keeps redelivery interoperable.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
UNACKED_MUTEX = "unacked_mutex"

#: KEYS: the queue's priority lists in consume order, then the unacked hash, its index, this process's holdings.
#: ARGV: max messages, now, the predict task name, begin's five constants, then messages already popped by BRPOP.
#: Returns {messages, begun}: per message three numbers (begin's reply), or {-1, 0, 0} when it was not begun.
_FETCH = BEGIN_LUA + """
local n, now = tonumber(ARGV[1]), ARGV[2]
local c = {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]}
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
for i = 9, #ARGV do open = take(ARGV[i]) and open end
for i = 1, #KEYS - 3 do
  while open and #out < n do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    open = take(m)
  end
end
return {out, begun}
"""


@dataclass
class Fetched:
    """One batch: the raw messages, when they were taken, and per message what beginning its job found (None
    for a message the script could not read)."""

    raws: list[bytes]
    started_at: float
    begun: list[Begun | None]


class BatchFetcher:
    """Fetches batches from one queue's lists for one worker process."""

    def __init__(self, redis: Any, lists: Sequence[str], keys: Keys, worker_id: str, record_ttl: int,
                 max_messages: int) -> None:
        self.redis = redis
        self.lists = list(lists)
        self.keys = [*lists, UNACKED, UNACKED_INDEX, keys.worker_deliveries(worker_id)]
        self.args = [PREDICT, *begin_args(keys, worker_id, record_ttl)]
        self.max_messages = max_messages
        self._script = redis.register_script(_FETCH)

    def _run(self, popped: Sequence[bytes] = ()) -> Fetched:
        now = time.time()
        raws, begun = self._script(keys=self.keys, args=[self.max_messages, repr(now), *self.args, *popped])
        return Fetched(list(raws), now, [None if int(b[0]) < 0 else parse_begun(b, now) for b in begun])

    def fetch(self, block_s: float = 1.0) -> Fetched:
        """Up to ``max_messages`` messages; waits up to ``block_s`` for the first when the queue is empty."""
        batch = self._run()
        if batch.raws or block_s <= 0:
            return batch
        popped = self.redis.brpop(self.lists, timeout=block_s)  # wakes as soon as a message arrives
        # NOTE: between this BRPOP and the script the message is in neither the queue nor the unacked hash; a
        # worker killed in that instant loses it (kombu's own BRPOP consumer has the same window).
        return self._run([popped[1]]) if popped is not None else batch
