"""Routing: the only place that maps (adapter, device) to a queue.

Queue names are public (``infer.<adapter>.<device>``, e.g. ``infer.simple.cpu``) so that any Celery producer
can send jobs to a pool. :func:`route_task` is installed as Celery's router: it reads ``adapter`` and
``device`` from the job payload, falling back to the settings' defaults.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable

from kombu import Exchange, Queue

from shared.settings import FleetSettings, get_settings

ADAPTERS: tuple[str, ...] = ("simple", "torchscript", "torchserve", "triton")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
QUEUE_PREFIX = "infer"
#: Priority levels the Redis transport keeps as separate lists (a job's priority 0-9 lands in the nearest).
PRIORITY_STEPS: list[int] = [0, 3, 6, 9]
#: Separator kombu puts between a queue name and its priority step in the Redis list name.
#: NOTE: kombu's own default: any Celery client configured with nothing but the broker URL reads and writes the
#: same lists (priority tasks, and the reply lists of remote control).
PRIORITY_SEP = "\x06\x16"


def queue_name(adapter: str, device: str) -> str:
    """The public queue of a pool. Raises ``ValueError`` for an unknown adapter or device."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    return f"{QUEUE_PREFIX}.{adapter}.{device}"


def parse_queue_name(name: str) -> tuple[str, str]:
    prefix, _, rest = name.partition(".")
    adapter, _, device = rest.partition(".")
    if prefix != QUEUE_PREFIX:
        raise ValueError(f"not a fleet queue: {name!r}")
    queue_name(adapter, device)  # validates
    return adapter, device


def broker_priority(priority: int) -> int:
    """The Celery ``priority`` for a fleet priority (9 = most urgent).

    NOTE: kombu's Redis transport serves its lowest priority number first, the reverse of the fleet's (and
    AMQP's) scale, so the number is flipped here, in one place.
    """
    return 9 - max(0, min(9, int(priority)))


def pool_of(adapter: str | None, device: str | None, settings: FleetSettings | None = None) -> tuple[str, str]:
    """The pool ``(adapter, device)`` of a job that names them or not: the one place defaults are applied."""
    settings = settings or get_settings()
    return adapter or settings.serving_adapter_type, device or settings.default_device


def queue_for_job(job: dict[str, Any] | None, settings: FleetSettings | None = None) -> str:
    """The queue a job payload goes to: its ``adapter``/``device`` or the configured defaults."""
    job = job or {}
    return queue_name(*pool_of(job.get("adapter"), job.get("device"), settings))


def all_queues() -> list[Queue]:
    """Every pool queue, declared on one direct exchange (routing key = queue name)."""
    exchange = Exchange(QUEUE_PREFIX, type="direct")
    return [
        Queue(queue_name(a, d), exchange, routing_key=queue_name(a, d), queue_arguments={"x-max-priority": 9})
        for a in ADAPTERS
        for d in DEVICES
    ]


def pools_from_spec(spec: str) -> list[str]:
    """Queue names from an ``adapter:device,adapter:device`` spec (as in ``POOLS``)."""
    queues = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        adapter, _, device = item.partition(":")
        queues.append(queue_name(adapter, device or "cpu"))
    return queues


def _step_list(queue: str, step: int) -> str:
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def redis_list_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority step (to measure queue depth)."""
    return [_step_list(queue, step) for step in PRIORITY_STEPS]


def priority_list(queue: str, broker_priority: int) -> str:
    """The list kombu keeps messages of ``broker_priority`` (0 = served first) in (its ``_q_for_pri``)."""
    clamped = max(0, min(int(broker_priority or 0), PRIORITY_STEPS[-1]))
    return _step_list(queue, max(s for s in PRIORITY_STEPS if s <= clamped))


def route_task(name: str, args: Iterable[Any], kwargs: dict[str, Any], options: dict[str, Any],
               task: Any = None, **_: Any) -> dict[str, Any] | None:
    """Celery router: fleet tasks go to the queue their job names; other tasks keep Celery's default."""
    if not name.startswith("fleet."):
        return None
    job = (kwargs or {}).get("job")
    queue = queue_for_job(job if isinstance(job, dict) else None)
    return {"queue": queue, "routing_key": queue, "exchange": QUEUE_PREFIX}


# -- cache-aware routing -----------------------------------------------------------------------------------------
#: KEYS: the model's holder set, its assignment, the pool's members, the heartbeats, the pool list for the
#: message's priority.
#: ARGV: the message, the oldest live heartbeat, the backlog bound, the own-queue key prefix, the own list's suffix
#: for the message's priority, the assignment TTL, then every priority step's suffix.
#: Returns {how, process}: ``holder`` (a live holder under the bound), ``copy`` (every holder is over it: a new
#: copy), ``place`` (no live holder: the cheapest place), or ``pool`` (no process under the bound: any takes it).
ROUTE_LUA = """
local live_since, bound = tonumber(ARGV[2]), tonumber(ARGV[3])
local function live(w)
  if not redis.call('ZSCORE', KEYS[3], w) then return false end
  return tonumber(redis.call('ZSCORE', KEYS[4], w) or '-1') >= live_since
end
-- Jobs waiting in a process's own queue (not those in hand: a process busy with a batch still takes its models').
local function backlog(w)
  local n = 0
  for i = 7, #ARGV do n = n + redis.call('LLEN', ARGV[4] .. w .. ARGV[i]) end
  return n
end
local best, best_n, held = nil, nil, false
local candidates = redis.call('SMEMBERS', KEYS[1])
local assigned = redis.call('GET', KEYS[2])
if assigned then candidates[#candidates + 1] = assigned end
for _, w in ipairs(candidates) do
  if live(w) then
    held = true
    local n = backlog(w)
    if n < bound and (best == nil or n < best_n) then best, best_n = w, n end
  end
end
local how = 'holder'
if best == nil then
  -- Placement, as ModelMesh does: where loading evicts least (the member's cost, below 0.5 with room, else
  -- by the recency of what it would evict, below 1) plus what already waits there.
  how = held and 'copy' or 'place'
  local members = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local best_cost = nil
  for i = 1, #members, 2 do
    local w = members[i]
    if tonumber(redis.call('ZSCORE', KEYS[4], w) or '-1') >= live_since then
      local n = backlog(w)
      local cost = n + tonumber(members[i + 1])
      if n < bound and (best_cost == nil or cost < best_cost) then best, best_cost = w, cost end
    end
  end
  if best ~= nil then redis.call('SET', KEYS[2], best, 'EX', ARGV[6]) end
end
if best == nil then
  redis.call('LPUSH', KEYS[5], ARGV[1])
  return {'pool', ''}
end
redis.call('LPUSH', ARGV[4] .. best .. ARGV[5], ARGV[1])
return {how, best}
"""

#: KEYS: the pool's members, then the own queue's lists, then the pool's lists (same priority order). ARGV: the
#: process. Atomic with :data:`ROUTE_LUA`: once it ran, nothing is routed to the process any more.
RETIRE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
local steps, moved = (#KEYS - 1) / 2, 0
for i = 1, steps do
  while redis.call('LMOVE', KEYS[1 + i], KEYS[1 + steps + i], 'LEFT', 'RIGHT') do moved = moved + 1 end
end
return moved
"""


class LuaScript:
    """A script as redis-py pipelines load it before they run (``pipe.scripts``: they read ``script`` and
    ``sha``, and set ``sha`` from SCRIPT LOAD)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()


ROUTE_SCRIPT = LuaScript(ROUTE_LUA)


def step_suffixes() -> list[str]:
    """What kombu appends to a queue's name for each priority step (see :func:`redis_list_keys`)."""
    return [_step_list("", step) for step in PRIORITY_STEPS]


class JobRouter:
    """Decides, in one atomic Redis script, which list a job's message goes to: the own queue of a live process
    of its pool that holds its model and is not overloaded, else of the one where loading it evicts least, else
    the pool queue.

    Used by the API (inside the MULTI that records the job) and by :func:`send_job` (any Celery producer). The
    message is the same in every case and names the pool queue as its routing key: whatever gives it back (a
    dying process's supervisor, the reaper, a visibility sweep) returns it to the pool queue.

    Args:
        keys: The fleet's key names (``shared.keys.Keys``).
        settings: Reads ``ROUTING_*`` and ``WORKER_LOST_AFTER_SECONDS``.
    """

    def __init__(self, keys: Any, settings: FleetSettings | None = None) -> None:
        from shared.keys import MODEL_ASSIGNED_TTL_S

        self.keys = keys
        self.settings = settings or get_settings()
        self.assigned_ttl = MODEL_ASSIGNED_TTL_S
        self._suffixes = step_suffixes()

    @property
    def enabled(self) -> bool:
        return self.settings.routing.cache_aware

    def route(self, pipe: Any, queue: str, model_id: str | None, message: bytes, broker_priority: int,
              now: float | None = None) -> None:
        """Queue on ``pipe`` (a sync or asyncio pipeline, MULTI or not) the push of ``message`` for ``model_id``.

        Without a model (a batch job, an unload) or with routing off, the message goes to the pool queue.
        """
        pool_list = priority_list(queue, broker_priority)
        if not self.enabled or not model_id:
            pipe.lpush(pool_list, message)
            return
        keys = self.keys
        live_since = (now if now is not None else time.time()) - self.settings.worker_lost_after_seconds
        # NOTE: the pipeline loads its scripts (SCRIPT EXISTS / LOAD) before it sends them: an EVALSHA inside a
        # MULTI cannot fall back to EVAL once the transaction is queued.
        pipe.scripts.add(ROUTE_SCRIPT)
        pipe.evalsha(ROUTE_SCRIPT.sha, 5, keys.model_holders(queue, model_id), keys.model_assigned(queue, model_id),
                     keys.routing_members(queue), keys.workers(), pool_list,
                     message, repr(live_since), self.settings.routing.max_backlog, keys.worker_queue(""),
                     priority_list("", broker_priority), self.assigned_ttl, *self._suffixes)

    def retire(self, client: Any, worker_id: str, queue: str) -> int:
        """Take a process out of routing and give what waits in its own queue back to the head of the pool queue
        (sync client); returns how many messages went back. Safe to call again."""
        keys = [self.keys.routing_members(queue), *redis_list_keys(self.keys.worker_queue(worker_id)),
                *redis_list_keys(queue)]
        return int(client.eval(RETIRE_LUA, len(keys), *keys, worker_id))


def send_job(app: Any, redis: Any, task: str, job: dict[str, Any], job_id: str | None = None,
             settings: FleetSettings | None = None) -> Any:
    """Send a fleet task the way the API does, cache-aware: what a Celery producer calls instead of
    ``send_task`` to have its jobs go to the processes that hold their model. Returns Celery's ``AsyncResult``.

    ``redis`` is a sync client of the broker; ``job`` is the task's ``job`` argument (a predict or load job
    naming ``symbol``, ``timeframe`` and ``model_type``). A plain ``send_task`` on the pool queue keeps working:
    any process of the pool takes it.
    """
    import uuid

    from shared import celery_wire
    from shared.keys import Keys
    from shared.schemas import model_id_for

    settings = settings or get_settings()
    job_id = job_id or str(uuid.uuid4())
    queue = queue_for_job(job, settings)
    priority = broker_priority(job.get("priority", 5))
    model_id = (model_id_for(job["symbol"], job["timeframe"], job["model_type"])
                if all(job.get(k) for k in ("symbol", "timeframe", "model_type")) else None)
    _, message = celery_wire.task_message(task, job_id, {"job": job}, queue, priority)
    router = JobRouter(Keys(settings.redis_key_prefix), settings)
    pipe = redis.pipeline(transaction=False)
    router.route(pipe, queue, model_id, message, priority)
    pipe.execute()
    return app.AsyncResult(job_id)
