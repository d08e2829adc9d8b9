"""Remote-control commands of the fleet, answered by every worker of both engines.

``app.control.broadcast(name, reply=True)`` reaches them. They run in a node's main process, which holds no
models: the processes that run jobs publish their state to Redis in their heartbeat, and these commands read
back those of this node. The Celery engine registers them with ``control_command``; the batching engine hands
the same functions to its pidbox node.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.control import control_command

from shared import redis_options
from shared import tasks as names
from shared.keys import WORKER_HEARTBEAT_TTL_S, Keys
from shared.settings import get_settings
from shared.stats import StatsReader


def _reader() -> StatsReader:
    settings = get_settings()
    client = redis_options.client(settings, socket_connect_timeout=5, socket_timeout=10)
    return StatsReader(client, Keys(settings.redis_key_prefix))


def _node_processes(reader: StatsReader, hostname: str) -> list[str]:
    return [w for w in reader.live_workers() if w.split("|", 1)[0] == hostname]


def list_models(hostname: str) -> dict[str, Any]:
    """The models each process of this node holds now."""
    reader = _reader()
    return {"processes": {w: [m.model_dump(mode="json") for m in reader.worker_models(w)]
                          for w in _node_processes(reader, hostname)}}


def health(hostname: str) -> dict[str, Any]:
    """Liveness of each process of this node, from its last heartbeat, with the reason when unhealthy."""
    reader = _reader()
    now = time.time()
    procs = {}
    for w in _node_processes(reader, hostname):
        raw = {k.decode(): v.decode() for k, v in reader.redis.hgetall(reader.keys.worker_stats(w)).items()}
        age = now - float(raw.get("heartbeat", 0))
        procs[w] = {"healthy": raw.get("healthy") == "1" and age < WORKER_HEARTBEAT_TTL_S,
                    "reason": raw.get("unhealthy_reason", ""),
                    "heartbeat_age_s": round(age, 3), "models_loaded": int(float(raw.get("models_loaded", 0)))}
    return {"healthy": bool(procs) and all(p["healthy"] for p in procs.values()), "processes": procs}


@control_command(name=names.CONTROL_LIST_MODELS)
def fleet_list_models(state: Any) -> dict[str, Any]:
    """The models each process of this worker holds now."""
    return list_models(state.consumer.hostname)


@control_command(name=names.CONTROL_HEALTH)
def fleet_health(state: Any) -> dict[str, Any]:
    """Liveness of each process of this worker, from its last heartbeat."""
    return health(state.consumer.hostname)
