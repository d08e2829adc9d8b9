"""A malformed message on a pool's queue (any Redis client can push one) is quarantined in the pool's dead
letters with the reason, and never takes a consumer down: the same processes serve the next job."""

from __future__ import annotations

import json

from shared import routing, tasks
from shared.keys import Keys
from tests.helpers import wait_for
from tests.integration.test_engine_contract import KEY, TIMEOUT, series

QUEUE = "infer.simple.cpu"
JUNK = [
    b"\xff\xfe not even utf-8",
    b"{not json",
    json.dumps({"body": "e30=", "headers": {}, "properties": {}}).encode(),  # an envelope with no task or id
    json.dumps([1, 2, 3]).encode(),
    json.dumps({"body": "e30=", "content-type": "application/x-python-serialize",  # a pickled body: refused
                "headers": {"id": "pickled-job", "task": tasks.PREDICT},
                "properties": {"delivery_tag": "p1"}}).encode(),
]


def test_malformed_messages_are_dead_lettered_and_consumers_keep_running(engine, start_worker, producer, redis_client,
                                                                         fleet_settings) -> None:
    keys = Keys(fleet_settings.redis_key_prefix)
    worker = start_worker(engine=engine, concurrency=2)
    pids = wait_for(lambda: len(worker.processes()) == 2 and worker.processes(), TIMEOUT, "both processes")
    before = redis_client.llen(keys.dead_letters(QUEUE))  # earlier tests of the session left theirs
    for junk in JUNK:
        redis_client.lpush(routing.priority_list(QUEUE, 0), junk)
    letters = wait_for(lambda: (found := [json.loads(r) for r in redis_client.lrange(keys.dead_letters(QUEUE),
                                                                                       before, -1)])
                       and len(found) >= len(JUNK) and found, TIMEOUT, "every malformed message dead-lettered")
    assert {letter["reason"] for letter in letters} == {"unreadable"}
    assert all(letter["error"]["type"] and letter["raw"] for letter in letters)
    assert any("not even utf-8" in letter["raw"] for letter in letters)
    pickled = [letter for letter in letters if letter["job_id"] == "pickled-job"]
    assert pickled and pickled[0]["error"]["type"] == "InvalidInputError" and "payload" not in pickled[0]
    # the pickled job's id was readable: it failed typed rather than vanishing
    assert redis_client.hget(keys.job("pickled-job"), "status") in (b"failed", None)
    ok = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(1)}}})
    assert len(ok.get(timeout=TIMEOUT)["predictions"]) > 0
    assert worker.processes() == pids, "a consumer was replaced: a malformed message took it down"


async def test_a_requeued_poison_job_runs_as_new(aiohttp_client, start_worker, redis_client, fleet_settings,
                                                 api_key) -> None:
    from producer_api.app import create_app

    keys = Keys(fleet_settings.redis_key_prefix)
    job_id = "poisoned-once"
    payload = {**KEY, "inputs": {"series": series(2)}, "n_steps": 4}
    # what the executor wrote when the job hit JOB_MAX_DELIVERIES (the cause has since been fixed)
    redis_client.hset(keys.job(job_id), mapping={"status": "failed", "deliveries": 4, "kind": "predict",
                                                 "last_failure": "killed by signal 9 in w|1"})
    redis_client.rpush(keys.dead_letters(QUEUE), json.dumps({
        "job_id": job_id, "task": tasks.PREDICT, "queue": QUEUE, "reason": "poison", "payload": payload,
        "error": {"type": "PoisonJobError", "message": "delivered 4 times", "retryable": False}, "deliveries": 4}))
    start_worker(engine="batching", concurrency=1)
    api = await aiohttp_client(create_app(fleet_settings), headers={"X-API-Key": api_key})
    listed = (await (await api.get("/v1/dead-letters")).json())["dead_letters"]
    assert job_id in {letter["job_id"] for letter in listed}
    assert (await api.post("/v1/dead-letters", json={"job_id": job_id})).status == 202
    doc = await (await api.get(f"/v1/jobs/{job_id}?wait=30")).json()
    assert doc["status"] == "succeeded" and len(doc["result"]["predictions"]) == 4, doc
    assert redis_client.hget(keys.job(job_id), "deliveries") == b"1"
