"""Per-pool backlog for autoscaling: every job a pool still has to serve, wherever it waits in Redis.

A pool queue's jobs are in three places, and an autoscaler that reads only one list sees an idle pool while every
worker is saturated (KEDA's Redis list scaler reads one list: Celery on Redis keeps one per priority step):

* ``queued``: in the pool queue's lists, one per priority step (``routing.redis_list_keys``);
* ``routed``: in the own queues of the pool's routing members (``Keys.routing_members``), where cache-aware
  routing sent them because the process holds (or was placed) their model;
* ``in_hand``: taken and not yet acknowledged: kombu's ``unacked`` hash entries whose routing key is the pool
  queue (Celery's prefetched messages, a batching consumer's fetched batch, and every running job: the fleet
  acknowledges late, so a running job's message stays there until its outcome is written).

A message is in exactly one of these at a time (fetching moves it from a list into ``unacked`` in one step), so the
sum double-counts nothing. The ``unacked`` hash is read in bounded chunks by a read-only script that returns only
counts per routing key (the envelopes never cross the network); past :data:`UNACKED_MAX_SCAN` entries the counts
of the entries read are scaled to the hash's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from shared import routing
from shared.keys import Keys

#: kombu's Redis transport names this hash (its ``unacked_key``): delivery tag -> ``[envelope, exchange,
#: routing key]`` (the batching engine writes the same, see ``workers.engines.batching.fetch.UNACKED``).
KOMBU_UNACKED = "unacked"
#: Entries of ``unacked`` one script call reads (HSCAN's COUNT): each call stays short on Redis' one thread.
UNACKED_CHUNK = 1000
#: Entries read per snapshot at most; a larger hash is sampled (HSCAN visits entries in hash order, not by age).
UNACKED_MAX_SCAN = 50_000

#: KEYS: the unacked hash. ARGV: cursor, count. Returns {next cursor, entries read, routing key, n, ...}.
#: NOTE: the routing key is the entry's last JSON string; matched, not decoded, so a large envelope costs a scan.
_COUNT_LUA = """
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local entries, counts = reply[2], {}
for i = 2, #entries, 2 do
  local key = string.match(entries[i], '"([^"]*)"%s*%]%s*$') or ''
  counts[key] = (counts[key] or 0) + 1
end
local out = {reply[1], #entries / 2}
for key, n in pairs(counts) do
  out[#out + 1] = key
  out[#out + 1] = n
end
return out
"""


@dataclass(frozen=True)
class PoolBacklog:
    """One pool queue's backlog, by where the jobs are."""

    queued: int = 0
    routed: int = 0
    in_hand: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.routed + self.in_hand

    def kinds(self) -> dict[str, int]:
        """``{"queued", "routed", "in_hand"}`` -> count, in that order (the ``kind`` label of the metric)."""
        return {"queued": self.queued, "routed": self.routed, "in_hand": self.in_hand}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def own_queue_lists(keys: Keys, members: Iterable[Any]) -> list[str]:
    """The lists of the own queues of ``members`` (consumer process ids), every priority step of each."""
    return [key for member in members for key in routing.redis_list_keys(keys.worker_queue(_text(member)))]


def tally_unacked(replies: Iterable[list[Any]], length: int) -> tuple[dict[str, int], bool]:
    """Routing key -> entries, from the count script's replies; scaled to ``length`` when the scan stopped early.

    Returns:
        The counts, and whether they are an estimate (the scan read fewer entries than ``length``).
    """
    counts: dict[str, int] = {}
    seen, finished = 0, False
    for reply in replies:
        cursor, read, rest = _text(reply[0]), int(reply[1]), reply[2:]
        seen += read
        finished = cursor == "0"
        for key, n in zip(rest[::2], rest[1::2]):
            counts[_text(key)] = counts.get(_text(key), 0) + int(n)
    if finished or not seen or seen >= length:
        return counts, False
    return {key: round(n * length / seen) for key, n in counts.items()}, True


async def unacked_by_routing_key(redis: Any, max_scan: int = UNACKED_MAX_SCAN,
                                 chunk: int = UNACKED_CHUNK) -> dict[str, int]:
    """Entries of kombu's ``unacked`` hash per routing key (an estimate past ``max_scan`` entries)."""
    length = int(await redis.hlen(KOMBU_UNACKED))
    if not length:
        return {}
    script = redis.register_script(_COUNT_LUA)
    replies, cursor, seen = [], "0", 0
    while True:
        reply = await script(keys=[KOMBU_UNACKED], args=[cursor, chunk])
        replies.append(reply)
        cursor, seen = _text(reply[0]), seen + int(reply[1])
        if cursor == "0" or seen >= max_scan:
            break
    return tally_unacked(replies, length)[0]


async def pool_backlogs(redis: Any, keys: Keys, queues: Iterable[str] | None = None,
                        max_scan: int = UNACKED_MAX_SCAN) -> dict[str, PoolBacklog]:
    """The backlog of each pool queue (every fleet queue by default): two pipelines and the ``unacked`` scan.

    Args:
        redis: A ``redis.asyncio`` client (bytes or decoded replies).
        keys: The fleet's key names.
        queues: Pool queue names (``infer.<adapter>.<device>``).
        max_scan: Entries of ``unacked`` read at most (see :data:`UNACKED_MAX_SCAN`).
    """
    queues = list(queues) if queues is not None else [q.name for q in routing.all_queues()]
    steps = len(routing.PRIORITY_STEPS)
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for key in routing.redis_list_keys(queue):
            pipe.llen(key)
        pipe.zrange(keys.routing_members(queue), 0, -1)
    replies = iter(await pipe.execute())
    queued, members = {}, {}
    for queue in queues:
        queued[queue] = sum(int(next(replies)) for _ in range(steps))
        members[queue] = list(next(replies))
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for key in own_queue_lists(keys, members[queue]):
            pipe.llen(key)
    lengths = iter(await pipe.execute())
    routed = {queue: sum(int(next(lengths)) for _ in range(steps * len(members[queue]))) for queue in queues}
    in_hand = await unacked_by_routing_key(redis, max_scan=max_scan)
    return {queue: PoolBacklog(queued=queued[queue], routed=routed[queue], in_hand=in_hand.get(queue, 0))
            for queue in queues}
