"""(a) and (b) of the many-models benchmark: the fleet as shipped (``fleet worker`` with the batching engine,
``fleet api``), with plain pool routing (``ROUTING_CACHE_AWARE=false``: today's behaviour before issue 13) or with
cache-aware routing and copies (the default), ``processes`` consumers with caches of ``cache_per_process``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.procs import Proc, free_port, python_env, wait_until
from bench.systems.fleet import ROOT, bench_api_key, fleet_argv, wait_api_ready


class FleetManyModels:
    """One fleet on its own Redis database and key prefix."""

    def __init__(self, name: str, redis_url: str, store_dir: Path, log_dir: Path, processes: int,
                 cache_per_process: int, cache_aware: bool) -> None:
        self.name = name
        self.redis_url = redis_url
        self.prefix = f"mm-{name}"
        self.log_dir = log_dir
        self.processes = processes
        self.cache_aware = cache_aware
        self.env = python_env(REDIS_URL=redis_url, REDIS_KEY_PREFIX=self.prefix, MODEL_STORE_DIR=str(store_dir),
                              LOG_LEVEL="WARNING", POOLS="simple:cpu", RESULT_TTL_SECONDS="600",
                              SIMPLE_MAX_MODELS_IN_MEMORY=str(cache_per_process),
                              ROUTING_CACHE_AWARE="true" if cache_aware else "false")
        self.workers: Proc | None = None
        self.api: Proc | None = None
        self.url = ""
        self.api_key = ""

    def start(self) -> None:
        import redis

        from shared.keys import Keys
        from shared.stats import StatsReader

        self.workers = Proc(f"fleet-worker-{self.name}", fleet_argv(
            "worker", "--adapter", "simple", "--device", "cpu", "-c", str(self.processes), "-l", "WARNING"),
            self.env, self.log_dir, cwd=ROOT)
        reader = StatsReader(redis.Redis.from_url(self.redis_url), Keys(self.prefix))
        wait_until(lambda: len(reader.live_workers()) >= self.processes, 180, f"fleet workers ({self.name})",
                   [self.workers])
        port = free_port()
        self.api = Proc(f"fleet-api-{self.name}", fleet_argv("api", "--host", "127.0.0.1", "--port", str(port)),
                        self.env, self.log_dir, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"
        wait_api_ready(self.api, self.url, self.name)
        self.api_key = bench_api_key(self.env)

    def procs(self) -> list[Proc]:
        return [p for p in (self.workers, self.api) if p is not None]

    async def predict(self, session: Any, key: dict[str, str], series_json: list) -> None:
        """One forecast through ``POST /v1/predict?wait=30`` (JSON lists, as the Ray Serve system gets)."""
        body = json.dumps({**key, "inputs": {"series": series_json}})
        headers = {"Content-Type": "application/json", "X-API-Key": self.api_key}
        async with session.post(f"{self.url}/v1/predict?wait=30", data=body, headers=headers) as resp:
            raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {raw[:200]!r}")
        doc = json.loads(raw)
        if doc.get("status") != "succeeded":
            raise RuntimeError(f"job {doc.get('status')}: {json.dumps(doc.get('error'))[:200]}")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the API process and of the worker (its supervisor and every consumer)."""
        from bench.procs import tree_cpu_seconds

        return {"api": tree_cpu_seconds([self.api] if self.api else []),
                "workers": tree_cpu_seconds([self.workers] if self.workers else [])}

    def counters(self) -> dict[str, float]:
        """The fleet's cache counters now (cold loads, their milliseconds, lookups)."""
        import redis

        from shared.keys import Keys

        raw = redis.Redis.from_url(self.redis_url).hgetall(Keys(self.prefix).fleet_stats())
        h = {k.decode(): float(v) for k, v in raw.items()}
        return {"loads": h.get("cache_loads", h.get("cache_misses", 0.0)), "load_ms": h.get("cache_load_ms", 0.0),
                "hits": h.get("cache_hits", 0.0), "misses": h.get("cache_misses", 0.0)}

    def copies(self) -> dict[str, float]:
        """How many processes hold each model now (from the workers' heartbeats): copies of hot models."""
        import redis

        from shared.keys import Keys
        from shared.stats import StatsReader

        reader = StatsReader(redis.Redis.from_url(self.redis_url), Keys(self.prefix))
        held: dict[str, int] = {}
        for worker in reader.live_workers():
            for model in reader.loaded_model_ids(worker):
                held[model] = held.get(model, 0) + 1
        return {"models_held": len(held), "most_copies": max(held.values(), default=0),
                "models_with_copies": sum(1 for n in held.values() if n > 1)}

    def stop(self) -> None:
        for proc in (self.api, self.workers):
            if proc is not None:
                proc.stop(15)
        self.api = self.workers = None
