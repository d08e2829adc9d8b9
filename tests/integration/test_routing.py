"""Cache-aware routing with real batching workers on a real Redis: each model's jobs are served by the process that
holds it (the job record's ``worker``); when the holder dies (the consumer alone, or its whole host) the jobs routed
to it are served elsewhere within the supervisor's or the reaper's bound; a plain ``send_task`` on the pool queue
still works. ``tests/unit/test_routing_cache_aware.py`` pins each step (own queue, give-back, stealing) alone."""

from __future__ import annotations

import os
import signal
import time

from shared import routing, tasks
from shared.keys import Keys
from tests.helpers import wait_for
from tests.integration.conftest import send
from tests.integration.test_engine_contract import record

QUEUE = "infer.simple.cpu"
M1 = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst"}
M2 = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst"}
TIMEOUT = 90


def job(model: dict, i: int = 0) -> dict:
    from workers.training.synthetic import generate_bars

    return {**model, "inputs": {"series": generate_bars(model["symbol"], "1h", n_bars=300 + i, seed=5).values[-200:]
                                .tolist()}}


def model_id(model: dict) -> str:
    return f"{model['symbol']}_{model['timeframe']}_{model['model_type']}"


def holders(redis_client, keys: Keys, model: dict) -> set[str]:
    """The holders the router sees: listed for the model and still in routing."""
    listed = {h.decode() for h in redis_client.smembers(keys.model_holders(QUEUE, model_id(model)))}
    return {h for h in listed if redis_client.zscore(keys.routing_members(QUEUE), h) is not None}


def pid_of(worker_id: str) -> int:
    return int(worker_id.rsplit("|", 1)[1])


def routed(producer, redis_client, settings, task: str, payload: dict):
    """Send as a Celery producer that uses the fleet's routing helper."""
    return routing.send_job(producer, redis_client, task, payload, settings=settings)


def load_apart(producer, redis_client, settings, keys: Keys) -> tuple[str, str]:
    """Load M1 and M2 through the router: placement puts them on different (empty) processes."""
    first = routed(producer, redis_client, settings, tasks.LOAD, M1)
    first.get(timeout=TIMEOUT)
    second = routed(producer, redis_client, settings, tasks.LOAD, M2)
    second.get(timeout=TIMEOUT)
    h1, h2 = holders(redis_client, keys, M1), holders(redis_client, keys, M2)
    assert len(h1) == 1 and len(h2) == 1 and h1 != h2, (h1, h2)
    return h1.pop(), h2.pop()


def served_by(redis_client, settings, results) -> set[str]:
    for result in results:
        assert len(result.get(timeout=TIMEOUT)["predictions"]) > 0
    return {record(redis_client, settings, r.id)["worker"] for r in results}


def test_jobs_go_to_their_model_s_holder_and_to_another_node_once_the_holder_s_host_is_lost(
        start_worker, producer, redis_client, fleet_settings) -> None:
    keys = Keys(fleet_settings.redis_key_prefix)
    # Two nodes of one process each; 8 s: the holder's heartbeat (every 5 s) is still fresh when jobs are sent.
    a = start_worker(concurrency=1, WORKER_LOST_AFTER_SECONDS="8")
    b = start_worker(concurrency=1, WORKER_LOST_AFTER_SECONDS="8")
    h1, h2 = load_apart(producer, redis_client, fleet_settings, keys)
    assert {h1, h2} == {*a.ids, *b.ids}

    results = [routed(producer, redis_client, fleet_settings, tasks.PREDICT, job(m, i))
               for i in range(4) for m in (M1, M2)]
    assert served_by(redis_client, fleet_settings, results[0::2]) == {h1}
    assert served_by(redis_client, fleet_settings, results[1::2]) == {h2}

    # The holder of M1's whole host freezes, then goes: jobs routed to it meanwhile wait in its own queue (its
    # heartbeat is still fresh), where the idle survivor steals them or, at the latest, a live node's reaper
    # gives them to the pool queue once the host's heartbeat is WORKER_LOST_AFTER old (plus a reaper round).
    lost, survivor = (a, b) if h1 in a.ids else (b, a)
    os.killpg(lost.proc.pid, signal.SIGSTOP)
    stranded = [routed(producer, redis_client, fleet_settings, tasks.PREDICT, job(M1, 20 + i)) for i in range(3)]
    os.killpg(lost.proc.pid, signal.SIGKILL)
    lost.proc.wait(10)
    killed_at = time.monotonic()
    assert served_by(redis_client, fleet_settings, stranded) == set(survivor.ids)
    took = time.monotonic() - killed_at
    assert took < 8 + 5 + 5, took
    assert redis_client.zscore(keys.routing_members(QUEUE), h1) is None
    # From now on M1 lives on the survivor: its jobs are routed there.
    wait_for(lambda: holders(redis_client, keys, M1) & set(survivor.ids), 15, "M1 to be held by the survivor")
    later = routed(producer, redis_client, fleet_settings, tasks.PREDICT, job(M1, 40))
    assert served_by(redis_client, fleet_settings, [later]) == set(survivor.ids)
    # A plain send_task on the pool queue, knowing nothing of routing, is served too.
    assert len(send(producer, tasks.PREDICT, job(M2, 9)).get(timeout=TIMEOUT)["predictions"]) > 0


def test_a_killed_consumer_s_routed_jobs_are_served_by_its_sibling_at_once(
        start_worker, producer, redis_client, fleet_settings) -> None:
    keys = Keys(fleet_settings.redis_key_prefix)
    worker = start_worker(concurrency=2)
    wait_for(lambda: len(worker.processes()) == 2, 60, "both consumers to be up")
    h1, h2 = load_apart(producer, redis_client, fleet_settings, keys)
    os.kill(pid_of(h1), signal.SIGSTOP)
    stranded = [routed(producer, redis_client, fleet_settings, tasks.PREDICT, job(M1, i)) for i in range(3)]
    os.kill(pid_of(h1), signal.SIGKILL)
    killed_at = time.monotonic()
    # The sibling steals what it can; the supervisor sees its consumer die within a tick and gives the rest to the
    # pool queue, where the sibling (or the replacement) takes it: none waits for a heartbeat to age.
    served = served_by(redis_client, fleet_settings, stranded)
    assert h1 not in served
    assert time.monotonic() - killed_at < 15
    assert worker.proc.poll() is None
