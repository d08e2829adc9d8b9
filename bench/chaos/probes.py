"""What runs beside the faults: the load generator, the job-event listener, the worker monitor, the poison killer.

Each is a daemon thread of the bench process (the main thread runs the fault timeline and starts processes).
They only observe and submit, except :class:`PoisonKiller`, which SIGKILLs the process running the poison job,
and only a pid the caller's ``may_signal`` vouches for (a pid in one of the run's own worker process groups).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

import redis

from bench.chaos.fleet import pid_of
from bench.chaos.tally import FINAL


class LoadGenerator(threading.Thread):
    """Submits predict jobs (``POST /v1/predict``, no wait) at a fixed rate until ``jobs`` are accepted.

    Submission ``i`` is due ``i / rate`` seconds after the start; at most ``in_flight`` are in flight. Anything but
    a 202 (a 503 while Redis is down, no answer at all) is a refusal: recorded, and the job is submitted again as a
    new one at the next slot. Every answer is kept in :attr:`submissions` (see :mod:`bench.chaos.tally`).
    """

    def __init__(self, url: str, key: str, bodies: Sequence[bytes], jobs: int, rate: float, in_flight: int,
                 content_type: str = "application/msgpack") -> None:
        super().__init__(name="chaos-load", daemon=True)
        self.url = f"{url}/v1/predict"
        self.headers = {"Content-Type": content_type, "X-API-Key": key}
        self.bodies = list(bodies)
        self.jobs = jobs
        self.rate = rate
        self.in_flight = in_flight
        self.submissions: list[dict[str, Any]] = []
        self.accepted = 0
        self.started_at: float | None = None
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._reserved = 0  # accepted + in flight: never more than ``jobs`` accepted
        self._ticket = 0
        self._t0 = 0.0

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by the run, which then stops
            self.error = exc

    async def _main(self) -> None:
        import aiohttp

        self._t0 = time.monotonic()
        self.started_at = time.time()
        connector = aiohttp.TCPConnector(limit=0)
        # NOTE: a 10 s client timeout: the API answers 503 within about a second while Redis is down; longer
        # would mean it hangs, which is itself worth counting (as "no answer").
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(*(self._loop(session) for _ in range(self.in_flight)))

    async def _loop(self, session: Any) -> None:
        import aiohttp

        while not self.stop_event.is_set() and self._reserved < self.jobs:
            i, self._ticket = self._ticket, self._ticket + 1
            self._reserved += 1
            delay = self._t0 + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.time()
            status, job_id = 0, None
            try:
                async with session.post(self.url, data=self.bodies[i % len(self.bodies)],
                                        headers=self.headers) as resp:
                    raw = await resp.read()
                    status = resp.status
                if status == 202:
                    job_id = json.loads(raw)["job_id"]
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError):
                status = 0 if status == 202 else status  # a 202 without a readable job id is no acceptance
            self.submissions.append({"sent": sent, "answered": time.time(), "status": status, "job_id": job_id})
            if job_id:
                self.accepted += 1
            else:
                self._reserved -= 1


class EventListener(threading.Thread):
    """PSUBSCRIBEs to every job's event channel and counts, per job, the events of each status.

    It re-subscribes when Redis goes away; :attr:`gaps` holds ``[lost, back]`` unix times of each interval it was
    not subscribed (what was published then is not seen: the tally checks against the model's counter).
    """

    def __init__(self, url: str, pattern: str) -> None:
        super().__init__(name="chaos-events", daemon=True)
        self.url = url
        self.pattern = pattern
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.gaps: list[list[float | None]] = []
        self.messages = 0
        self.subscribed = threading.Event()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            pubsub = client.pubsub()
            try:
                pubsub.psubscribe(self.pattern)
                while not self._halt.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "psubscribe":
                        if self.gaps and self.gaps[-1][1] is None:
                            self.gaps[-1][1] = time.time()
                        self.subscribed.set()
                    elif msg["type"] == "pmessage":
                        self._count(msg["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                if not self.gaps or self.gaps[-1][1] is not None:
                    self.gaps.append([time.time(), None])
                self._halt.wait(0.05)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass

    def _count(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            self.counts[str(event["job_id"])][str(event["status"])] += 1
            self.messages += 1
        except (ValueError, KeyError, TypeError):
            pass  # not a job event: nothing to count


class Monitor(threading.Thread):
    """Notes when each worker id first heart-beats (``Keys.workers``): replacements are found there."""

    def __init__(self, client: redis.Redis, workers_key: str, interval: float = 0.2) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.client = client
        self.key = workers_key
        self.interval = interval
        self.first_seen: dict[str, float] = {}
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def poll(self) -> None:
        try:
            ids = self.client.zrange(self.key, 0, -1)
        except (redis.RedisError, OSError):
            return  # Redis away: heartbeats are not written either
        now = time.time()
        for raw in ids:
            self.first_seen.setdefault(raw.decode() if isinstance(raw, bytes) else raw, now)

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)


class PoisonKiller(threading.Thread):
    """SIGKILLs the process running the poison job in each of its first ``max_deliveries`` runs, until its record
    is final.

    A run is a delivery the record says running (its ``deliveries`` tells them apart: after a kill the record
    still says running, with the dead process's id, until the next delivery begins it). The kill comes ``delay``
    seconds into the run, as a job that crashes its process mid-run would, not in the milliseconds between the
    fetch that marks it running and the executor: killing there would hit whatever else that fetch took. The
    delivery past ``max_deliveries`` is not killed: the fleet must refuse to run it (``PoisonJobError``).
    """

    def __init__(self, client: redis.Redis, record_key: str, may_signal: Callable[[int], bool],
                 max_deliveries: int, delay: float = 0.25, interval: float = 0.01) -> None:
        super().__init__(name="chaos-poison", daemon=True)
        self.client = client
        self.record_key = record_key
        self.may_signal = may_signal
        self.max_deliveries = max_deliveries
        self.delay = delay
        self.interval = interval
        self.kills: list[dict[str, Any]] = []
        self.final_status: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        killed: set[int] = set()
        seen: dict[int, float] = {}  # delivery -> when its run was first seen
        while not self._halt.is_set():
            try:
                rec = {k.decode(): v.decode() for k, v in self.client.hgetall(self.record_key).items()}
            except (redis.RedisError, OSError):
                self._halt.wait(0.2)
                continue
            status = rec.get("status")
            if status in FINAL:
                self.final_status = status
                return
            delivery = int(rec.get("deliveries") or 0)
            pid = pid_of(rec.get("worker", ""))
            if status == "running" and delivery <= self.max_deliveries and delivery not in killed:
                first = seen.setdefault(delivery, time.monotonic())
                if time.monotonic() - first >= self.delay and pid and self.may_signal(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.kills.append({"at": time.time(), "pid": pid, "delivery": delivery,
                                           "worker": rec.get("worker")})
                    except ProcessLookupError:
                        pass
                    killed.add(delivery)
            self._halt.wait(self.interval)
