"""A trace-driven simulation of a fleet of many processes, routed by the fleet's own routing code.

This machine has two cores, so fleets of 8, 32 and 128 processes are simulated: simulated time, each process a
real :class:`workers.serving.cache.ModelCache` of ``cache_per_process`` models on the simulated clock, service
times taken from the measured ones (a hit costs ``hit_ms``, a miss ``load_ms`` more). What is not simulated is
the routing: in the cache-aware mode every arrival goes through :class:`shared.routing.JobRouter`'s script on a
real Redis, every process publishes what it holds and its placement cost with
:class:`workers.engines.batching.membership.RoutingMember` and :func:`workers.serving.pool.placement_cost`, and
takes its next job from its own queue before the pool's, as a batching consumer does. In the plain mode every job
goes to the pool queue and the longest-idle process takes it (today's behaviour).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Sequence

from bench.manymodels.workload import model_id
from bench.stats import percentile

QUEUE = "infer.simple.cpu"


class _Process:
    def __init__(self, worker_id: str, capacity: int, clock: Any) -> None:
        from workers.serving.cache import ModelCache

        self.id = worker_id
        self.cache: ModelCache[bool] = ModelCache(max_models=capacity, max_bytes=2**40, ttl_seconds=1e12,
                                                  sizeof=lambda _: 1, timer=clock)
        self.last_used: dict[str, float] = {}
        self.member: Any = None
        self.busy = False

    def cost(self, now: float) -> float:
        from workers.serving.pool import placement_cost

        held = [k for k, _ in self.cache.items()]
        coldest = min((self.last_used.get(k, 0.0) for k in held), default=now)
        return placement_cost(len(held) / self.cache.max_models, now - coldest)


def simulate(trace: Sequence[int], processes: int, cache_per_process: int, hit_ms: float, load_ms: float,
             rate: float, cache_aware: bool, redis_url: str | None = None, warmup: int = 0, redis: Any = None,
             max_backlog: int | None = None) -> dict[str, Any]:
    """Run the trace at ``rate`` requests/s (evenly spaced arrivals) through ``processes`` simulated processes.

    The cache-aware mode needs a Redis (``redis``, a client, or ``redis_url``); its keys get a prefix of their own.

    Returns hit ratio, loads per 1,000 requests and latency percentiles (ms), counted after ``warmup`` requests.
    """
    now = [0.0]

    def clock() -> float:
        return now[0]

    procs = [_Process(f"sim@node{i // 8}|{i}", cache_per_process, clock) for i in range(processes)]
    by_id = {p.id: p for p in procs}
    router = None
    if not cache_aware:
        redis = None
    else:
        import redis as redis_lib

        from shared import routing
        from shared.keys import Keys
        from shared.settings import FleetSettings
        from workers.engines.batching.membership import RoutingMember

        redis = redis or redis_lib.Redis.from_url(redis_url)
        prefix = f"sim-{processes}-{cache_per_process}"
        keys = Keys(prefix)
        for key in redis.scan_iter(f"{prefix}:*"):
            redis.delete(key)
        settings = FleetSettings(redis_key_prefix=prefix, worker_lost_after_seconds=3600)
        if max_backlog is not None:
            settings.routing.max_backlog = max_backlog
        router = routing.JobRouter(keys, settings)
        own_list = {p.id: routing.priority_list(keys.worker_queue(p.id), 0) for p in procs}
        pool_list = routing.priority_list(QUEUE, 0)
        for p in procs:
            p.member = RoutingMember(redis, keys, p.id, QUEUE, router)
            p.member.publish([], 0.0)
        redis.zadd(keys.workers(), {p.id: 1e9 for p in procs})  # always live: no process dies here
    pool: deque[int] = deque()
    idle: deque[_Process] = deque(procs)
    events: list[tuple[float, int, int, str]] = []  # (time, order, request, process id) completions
    arrivals = [i / rate for i in range(len(trace))]
    latencies: list[float] = []
    hits = misses = 0
    order = 0

    def start(proc: _Process, request: int) -> None:
        nonlocal hits, misses, order
        proc.busy = True
        key = model_id(int(trace[request]))
        service = hit_ms
        if proc.cache.get(key) is None:
            proc.cache.put(key, True)
            service += load_ms
            if request >= warmup:
                misses += 1
            proc.last_used[key] = now[0]
            if proc.member is not None:
                proc.member.publish([k for k, _ in proc.cache.items()], proc.cost(now[0]))
        elif request >= warmup:
            hits += 1
        proc.last_used[key] = now[0]
        order += 1
        heapq.heappush(events, (now[0] + service / 1000.0, order, request, proc.id))

    def next_job(proc: _Process) -> int | None:
        if redis is None:
            return pool.popleft() if pool else None
        raw = redis.rpop(own_list[proc.id]) or redis.rpop(pool_list)
        return None if raw is None else int(raw)

    i = 0
    while i < len(trace) or events:
        if events and (i >= len(trace) or events[0][0] <= arrivals[i]):
            now[0], _, request, pid = heapq.heappop(events)
            if request >= warmup:
                latencies.append((now[0] - arrivals[request]) * 1000.0)
            proc = by_id[pid]
            proc.busy = False
            job = next_job(proc)
            if job is None:
                idle.append(proc)
            else:
                start(proc, job)
            continue
        now[0] = arrivals[i]
        if redis is None:
            if idle:
                start(idle.popleft(), i)
            else:
                pool.append(i)
        else:
            pipe = redis.pipeline(transaction=False)
            router.route(pipe, QUEUE, model_id(int(trace[i])), str(i).encode(), 0, now=now[0])
            how, target = pipe.execute()[0]
            target = target.decode() if isinstance(target, bytes) else target
            chosen = by_id.get(target) if how != b"pool" and how != "pool" else None
            if chosen is not None and not chosen.busy:
                idle.remove(chosen)
                start(chosen, int(redis.rpop(own_list[chosen.id])))
            elif chosen is None and idle:
                taker = idle.popleft()
                start(taker, int(redis.rpop(pool_list)))
        i += 1
    n = hits + misses
    return {"processes": processes, "cache_per_process": cache_per_process, "cache_aware": cache_aware,
            "requests": n, "hit_ratio": hits / n if n else math.nan,
            "loads_per_1000": 1000.0 * misses / n if n else math.nan,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "rate": rate}
