"""Remote-control commands every worker of a pool answers (``app.control.broadcast(name, reply=True)``).

They run in the worker's main process, which in a prefork pool holds no models: the children publish their
state to Redis in their heartbeat, and these commands read back the children of this node.
"""

from __future__ import annotations

import time
from typing import Any

import redis as redis_lib
from celery.worker.control import control_command

from shared import tasks as names
from shared.keys import WORKER_HEARTBEAT_TTL_S, Keys
from shared.settings import get_settings
from shared.stats import StatsReader


def _reader() -> StatsReader:
    settings = get_settings()
    client = redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    return StatsReader(client, Keys(settings.redis_key_prefix))


def _node_processes(reader: StatsReader, hostname: str) -> list[str]:
    return [w for w in reader.live_workers() if w.split("|", 1)[0] == hostname]


@control_command(name=names.CONTROL_LIST_MODELS)
def fleet_list_models(state: Any) -> dict[str, Any]:
    """The models each process of this worker holds now."""
    reader = _reader()
    hostname = state.consumer.hostname
    return {"processes": {w: [m.model_dump(mode="json") for m in reader.worker_models(w)]
                          for w in _node_processes(reader, hostname)}}


@control_command(name=names.CONTROL_HEALTH)
def fleet_health(state: Any) -> dict[str, Any]:
    """Liveness of each process of this worker, from its last heartbeat."""
    reader = _reader()
    now = time.time()
    procs = {}
    for w in _node_processes(reader, state.consumer.hostname):
        raw = {k.decode(): v.decode() for k, v in reader.redis.hgetall(reader.keys.worker_stats(w)).items()}
        age = now - float(raw.get("heartbeat", 0))
        procs[w] = {"healthy": raw.get("healthy") == "1" and age < WORKER_HEARTBEAT_TTL_S,
                    "heartbeat_age_s": round(age, 3), "models_loaded": int(float(raw.get("models_loaded", 0)))}
    return {"healthy": bool(procs) and all(p["healthy"] for p in procs.values()), "processes": procs}
