"""Marking jobs running: the one writer of a record's ``running`` state, for both engines.

One Lua function does it per job, atomically: it reads whether the job already ended (a message delivered again
after its result was stored, or a job the API cancelled while it was queued: its record and result say so
already, and are not rewritten), counts the delivery, reads the cancel flag, and marks the job running with the
``running`` event. The batching engine's fetch script embeds the same function (:data:`BEGIN_LUA`) so that a
batch is fetched and begun in one round trip; the Celery engine calls :class:`BeginScript` per job.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from shared.keys import Keys
from workers.executor.delivery import Begun

#: ``begin(id, now, c)`` -> ``{cancelled, deliveries, finished_before}``, ``c`` being :func:`begin_args` in order.
BEGIN_LUA = """
local function begin(id, now, c)
  local key = c[3] .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'succeeded' or status == 'failed' or status == 'expired' or status == 'cancelled' then
    return {0, 0, 1}
  end
  local n = redis.call('HINCRBY', key, 'deliveries', 1)
  redis.call('EXPIRE', key, c[2])
  if redis.call('EXISTS', c[5] .. id) == 1 then return {1, n, 0} end
  redis.call('HSET', key, 'status', 'running', 'worker', c[1], 'started_at', now)
  redis.call('PUBLISH', c[4] .. id, '{"job_id":' .. cjson.encode(id) .. ',"status":"running","ts":' .. now .. '}')
  return {0, n, 0}
end
"""

_BEGIN_MANY = BEGIN_LUA + """
local c = {ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
local out = {}
for i = 7, #ARGV do out[#out + 1] = begin(ARGV[i], ARGV[1], c) end
return out
"""


def begin_args(keys: Keys, worker_id: str, record_ttl: int) -> list[Any]:
    """The constant arguments of ``begin``: worker, record TTL, record / event / cancel-flag key prefixes."""
    return [worker_id, record_ttl, keys.job(""), keys.job_events(""), keys.job_cancelled("")]


def parse_begun(reply: Sequence[int], started_at: float) -> Begun:
    cancelled, deliveries, finished = (int(x) for x in reply)
    return Begun(started_at, bool(cancelled), deliveries, bool(finished))


class BeginScript:
    """Begins jobs in one round trip (the Celery engine: one job per task)."""

    def __init__(self, redis: Any, keys: Keys, worker_id: str, record_ttl: int) -> None:
        self._args = begin_args(keys, worker_id, record_ttl)
        self._script = redis.register_script(_BEGIN_MANY)

    def __call__(self, job_ids: Sequence[str]) -> list[Begun]:
        now = time.time()
        replies = self._script(keys=[], args=[repr(now), *self._args, *job_ids])
        return [parse_begun(r, now) for r in replies]
