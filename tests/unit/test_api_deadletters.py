"""Dead letters over the API (admin scope): list them, requeue a poison job as new, refuse the unrequeueable."""

from __future__ import annotations

import json
import time

from shared import tasks
from shared.routing import broker_priority
from shared.celery_wire import read_message
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, make_key, server,  # noqa: F401
                                         settings, sredis)

QUEUE = "infer.simple.cpu"


def bury(sredis, job_id: str | None, reason: str = "poison", **extra) -> None:
    letter = {"job_id": job_id, "task": tasks.PREDICT if reason == "poison" else None, "queue": QUEUE,
              "reason": reason, "error": {"type": "PoisonJobError", "message": "delivered 4 times", "retryable": False},
              "deliveries": 4, "dead_at": time.time(), **extra}
    if reason == "poison":
        letter["payload"] = {**PREDICT, "priority": 7}
    sredis.rpush(KEYS.dead_letters(QUEUE), json.dumps(letter))


async def test_list_and_requeue_a_poison_job(client, sredis, celery):
    bury(sredis, "job-1")
    bury(sredis, None, reason="unreadable", raw="\ufffd junk", raw_bytes=6)
    sredis.hset(KEYS.job("job-1"), mapping={"status": "failed", "deliveries": 4, "error": "{}", "worker": "w|1",
                                            "last_failure": "killed by signal 9"})
    sredis.set(KEYS.celery_result("job-1"), "{}")
    listed = (await (await client.get("/v1/dead-letters")).json())["dead_letters"]
    assert {(d["job_id"], d["reason"]) for d in listed} == {("job-1", "poison"), (None, "unreadable")}
    assert (await client.get(f"/v1/dead-letters?queue={QUEUE}&limit=1")).status == 200
    assert (await client.get("/v1/dead-letters?queue=elsewhere")).status == 422
    assert (await client.get("/v1/dead-letters?limit=0")).status == 422

    resp = await client.post("/v1/dead-letters", json={"job_id": "job-1"})
    assert resp.status == 202 and (await resp.json())["job_id"] == "job-1"
    (name, options), = celery.sent
    assert name == tasks.PREDICT and options["task_id"] == "job-1" and options["queue"] == QUEUE
    assert options["kwargs"]["job"]["symbol"] == "AAPL" and options["priority"] == broker_priority(7)
    record = {k.decode(): v.decode() for k, v in sredis.hgetall(KEYS.job("job-1")).items()}
    assert record["status"] == "queued" and record["deliveries"] == "0"
    assert not {"error", "worker", "last_failure"} & set(record)
    assert not sredis.exists(KEYS.celery_result("job-1"))
    assert [json.loads(r)["reason"] for r in sredis.lrange(KEYS.dead_letters(QUEUE), 0, -1)] == ["unreadable"]
    # requeued once: a second requeue finds nothing
    assert (await client.post("/v1/dead-letters", json={"job_id": "job-1"})).status == 404
    read_message(sredis.lrange(options["list"], 0, -1)[0])  # the message is a real task message


async def test_unreadable_messages_cannot_be_requeued_and_bad_bodies_are_422(client, sredis):
    bury(sredis, "pickled", reason="unreadable", raw="...")
    resp = await client.post("/v1/dead-letters", json={"job_id": "pickled"})
    assert resp.status == 409 and (await resp.json())["error"]["type"] == "NotRequeueableError"
    assert (await client.post("/v1/dead-letters", json={"job_id": ""})).status == 422
    assert (await client.post("/v1/dead-letters", json={"id": "x"})).status == 422


async def test_dead_letters_are_admin_business(client, aredis):
    reader = await make_key(aredis, "reader", ("read", "submit"))
    for method, path in (("get", "/v1/dead-letters"), ("post", "/v1/dead-letters")):
        resp = await getattr(client, method)(path, json={"job_id": "x"} if method == "post" else None,
                                             headers={"X-API-Key": reader})
        assert resp.status == 403
