"""One chaos run: start the fleet, load it, inject the faults in turn, wait for every job, collect, stop.

Order: the model store (the benchmark's seeded small and reference PatchTSTs), the AOF Redis, the event listener
(subscribed before anything is submitted), the workers, the API and its key, then the load and, on the main
thread, the fault timeline of :mod:`bench.chaos.plan`. After the last submission every accepted job gets
``deadline_s`` to end; then every record, the dead letters and the model's counter are read and handed to
:mod:`bench.chaos.tally`. Whatever happens, every process the run started is stopped (``finally`` + ``atexit``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import redis

from bench import host
from bench.chaos import tally
from bench.chaos.fleet import PREFIX, QUEUE, AofRedis, FleetApi, FleetWorker, fleet_env, node_of, pid_of
from bench.chaos.plan import ChaosMode, Step, planned_seconds, submit_rate, timeline
from bench.chaos.probes import EventListener, LoadGenerator, Monitor, PoisonKiller
from bench.procs import install_cleanup, orphans, stop_all

#: WORKER_LOST_AFTER_SECONDS given to the workers, so that the reaper's recovery fits in the run.
WORKER_LOST_AFTER_S = 5
#: JOB_MAX_DELIVERIES given to the workers (the fleet's default, said out loud).
JOB_MAX_DELIVERIES = 3
#: The poison job: a batch of the reference model, long enough (seconds) that its process is caught running it.
POISON_ITEMS, POISON_STEPS = 100, 1024


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


class ChaosRun:
    """The chaos run of ``mode`` against ``engine``; :meth:`run` returns everything the report needs."""

    def __init__(self, mode: ChaosMode, engine: str, log: Callable[[str], None] = print, keep: bool = False) -> None:
        from shared.keys import Keys

        self.mode = mode
        self.engine = engine
        self.log = log
        self.keep = keep
        self.keys = Keys(PREFIX)
        self.meta: dict[str, Any] = {}
        self.failures: list[dict[str, str]] = []
        self.faults: list[dict[str, Any]] = []
        self.workers: list[FleetWorker] = []
        self.killed_workers: set[int] = set()
        self.result: dict[str, Any] = {}

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        install_cleanup()
        started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
        self.meta.update(host.machine(), mode=self.mode.name, mode_notes=list(self.mode.notes), engine=self.engine,
                         started_at=time.strftime("%Y-%m-%d %H:%M:%S %z"), workdir=str(workdir))
        ok = False
        try:
            self._setup(workdir)
            self._load_and_faults()
            self._wait_final()
            self._collect()
            ok = True
        except Exception as exc:
            self.log(f"chaos run FAILED: {type(exc).__name__}: {exc}")
            self.failures.append({"step": "run", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
        finally:
            for probe in ("poison", "monitor", "listener"):
                if getattr(self, probe, None) is not None:
                    getattr(self, probe).stop()
                    if getattr(self, probe).is_alive():
                        getattr(self, probe).join(2)  # before Redis stops: its going is no gap of the run
            if getattr(self, "load", None) is not None:
                self.load.stop_event.set()
            # NOTE: the fleet goes before Redis: stop_all stops the newest first, and the restarted Redis is newer
            # than the workers, which would log a Redis outage at every shutdown.
            for proc in [w.proc for w in self.workers] + ([self.api.proc] if getattr(self, "api", None) else []):
                proc.stop(15)
            self.meta["logs"] = self._log_findings(workdir / "logs")
            stop_all()
            self.meta["orphans"] = orphans()
            self.meta["loadavg_end"] = os.getloadavg()
            self.meta["duration_s"] = round(time.monotonic() - started, 1)
            if ok and not self.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                self.log(f"chaos: work directory (logs) kept at {workdir}")
        if ok:
            self._tally()
        return {"meta": self.meta, "plan": self._plan(), "faults": self.faults, **self.result,
                "failures": self.failures}

    def _plan(self) -> dict[str, Any]:
        m = self.mode
        return {"jobs": m.jobs, "workers": m.workers, "concurrency": m.concurrency, "in_flight": m.in_flight,
                "rate_per_s": round(submit_rate(m), 1), "planned_s": planned_seconds(m),
                "deadline_s": m.deadline_s, "outage_s": m.outage_s,
                "timeline": [{"at_s": s.at_s, "kind": s.kind, "label": s.label} for s in timeline(m)],
                "env": {"WORKER_LOST_AFTER_SECONDS": WORKER_LOST_AFTER_S, "JOB_MAX_DELIVERIES": JOB_MAX_DELIVERIES},
                "poison": {"items": POISON_ITEMS, "n_steps": POISON_STEPS, "model": "ref"}}

    # -- set-up ----------------------------------------------------------------------------------------------
    def _setup(self, workdir: Path) -> None:
        import torch

        from bench.encodings import predict_body
        from bench.models import REFERENCE, SMALL, sample_series, save_models
        from bench.systems.fleet import ADAPTER, DEVICE

        torch.set_num_threads(1)  # the bench process never runs a model
        log_dir = workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        store = workdir / "model-store"
        self.meta["models"] = save_models(store)
        pool = {"adapter": ADAPTER, "device": DEVICE}
        self.bodies = [predict_body(s, {**SMALL.key_fields(), **pool}, "msgpack") for s in sample_series(SMALL, 16)]
        self.poison_body = self._poison_body([s for s in sample_series(REFERENCE, 8)], REFERENCE.key_fields(), pool)
        self.small_model_id = SMALL.model_id

        self.redis = AofRedis(workdir, log_dir)
        self.client = redis.Redis.from_url(self.redis.url, socket_connect_timeout=1, socket_timeout=10)
        self.log(f"redis-server (AOF, appendfsync everysec) on port {self.redis.port}")
        self.listener = EventListener(self.redis.url, self.keys.job_events("*"))
        self.listener.start()
        if not self.listener.subscribed.wait(15):
            raise RuntimeError("the job-event subscription did not start")
        self.monitor = Monitor(redis.Redis.from_url(self.redis.url, socket_connect_timeout=1, socket_timeout=5),
                               self.keys.workers())
        self.monitor.start()
        self.env = fleet_env(self.redis.url, store, self.engine, WORKER_LOST_AFTER_SECONDS=WORKER_LOST_AFTER_S,
                             JOB_MAX_DELIVERIES=JOB_MAX_DELIVERIES)
        self.log_dir = log_dir
        for _ in range(self.mode.workers):
            self._start_worker()
        self._wait_workers(self.workers, 180)
        self.per_node = min(len(self._process_ids(w)) for w in self.workers)
        self.log(f"{len(self.workers)} {self.engine} workers up, {self.per_node} heart-beating process(es) each")
        self.api = FleetApi(self.env, log_dir)
        self.api.wait_ready()
        self.api.make_key()
        self.log(f"fleet api on {self.api.url}, key made")

    @staticmethod
    def _poison_body(series: list[Any], key: dict[str, str], pool: dict[str, str]) -> bytes:
        import msgpack

        def item(s: Any) -> dict[str, Any]:
            raw = s.astype("<f4").tobytes()
            return {**key, "n_steps": POISON_STEPS,
                    "inputs": {"tensor": {"dtype": "float32", "shape": list(s.shape), "data": raw}}}
        return msgpack.packb({"requests": [item(series[i % len(series)]) for i in range(POISON_ITEMS)], **pool},
                             use_bin_type=True)

    def _start_worker(self) -> FleetWorker:
        worker = FleetWorker(len(self.workers), self.engine, self.mode.concurrency, self.env, self.log_dir)
        self.workers.append(worker)
        return worker

    def _process_ids(self, worker: FleetWorker, fresh_s: float = 30) -> list[str]:
        """Ids of ``worker``'s processes that heart-beat within ``fresh_s`` (consumers, pool children)."""
        ids = self.client.zrangebyscore(self.keys.workers(), time.time() - fresh_s, "+inf")
        return [i.decode() for i in ids if worker.owns(i.decode())]

    def _wait_workers(self, workers: list[FleetWorker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for w in workers:
                w.proc.check()
            if all(len(self._process_ids(w)) >= self.mode.concurrency for w in workers):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not all heart-beat within {timeout:.0f} s")
            time.sleep(0.2)

    def _may_signal(self, pid: int) -> bool:
        """Only a live pid of one of the run's own worker process groups is ever signalled."""
        return any(w.in_group(pid) for i, w in enumerate(self.workers) if i not in self.killed_workers)

    # -- load and faults -------------------------------------------------------------------------------------
    def _load_and_faults(self) -> None:
        rate = submit_rate(self.mode)
        self.load = LoadGenerator(self.api.url, self.api.key, self.bodies, self.mode.jobs, rate, self.mode.in_flight)
        self.poison: PoisonKiller | None = None
        self.load.start()
        while self.load.started_at is None:
            if not self.load.is_alive():
                raise RuntimeError(f"the load generator did not start: {self.load.error!r}")
            time.sleep(0.01)
        t0 = self.load.started_at
        self.log(f"load: {self.mode.jobs} predict jobs at {rate:.0f}/s, {self.mode.in_flight} in flight at most")
        for step in timeline(self.mode):
            self._sleep_until(t0 + step.at_s)
            fault = self._inject(step)
            self.faults.append(fault)
            detail = {k: v for k, v in fault.items() if k in ("victim", "node", "pid", "job_id", "outage_s", "marker",
                                                              "replacement")}
            held = f", holding {len(fault['held'])} job(s)" if "held" in fault else ""
            self.log(f"fault @ {fault['at'] - t0:6.1f}s: {step.label} {detail}{held}")
        limit = time.monotonic() + 3 * planned_seconds(self.mode) + 60
        last = 0.0
        while self.load.is_alive() and time.monotonic() < limit:
            self._check_processes()
            if time.monotonic() - last > 10:
                self.log(f"load: {self.load.accepted}/{self.mode.jobs} accepted, {len(self.load.submissions)} sent")
                last = time.monotonic()
            time.sleep(0.2)
        self.load.stop_event.set()
        self.load.join(15)
        if self.load.error is not None:
            raise RuntimeError(f"the load generator failed: {self.load.error!r}")
        self.load_ended = time.time()
        self.log(f"load done: {self.load.accepted} accepted of {len(self.load.submissions)} submissions")

    def _sleep_until(self, t: float) -> None:
        while time.time() < t:
            self._check_processes()
            if not self.load.is_alive():
                raise RuntimeError(f"the load generator stopped early: {self.load.error!r}")
            time.sleep(min(0.1, max(0.0, t - time.time())))

    def _check_processes(self) -> None:
        """The API and every worker the run did not kill must be alive (a fleet process that exits is a finding)."""
        self.api.proc.check()
        for i, w in enumerate(self.workers):
            if i not in self.killed_workers and not w.proc.alive():
                self.killed_workers.add(i)  # reported once, not signalled again
                self.failures.append({"step": "workers", "error": f"worker {w.name} exited by itself with "
                                      f"{w.proc.proc.returncode}", "traceback": w.proc.log_tail(3000)})
                self.log(f"WARNING: worker {w.name} exited by itself ({w.proc.proc.returncode})")

    def _inject(self, step: Step) -> dict[str, Any]:
        fault: dict[str, Any] = {"kind": step.kind, "label": step.label, "planned_s": step.at_s}
        if step.kind == "pool-kill":
            index = sum(1 for f in self.faults if f["kind"] == "pool-kill")
            self._kill_pool_process(self.workers[index % self.mode.workers], fault)
        elif step.kind == "worker-kill":
            self._kill_worker(self.workers[0], fault)
        elif step.kind == "poison":
            self._plant_poison(fault)
        elif step.kind == "malformed":
            marker = f"chaos-malformed-{uuid.uuid4().hex[:8]}"
            fault.update(marker=marker, at=time.time())
            from shared import routing

            self.client.lpush(routing.priority_list(QUEUE, 0), f"{marker} {{not json".encode())
        elif step.kind == "redis-restart":
            fault["at"] = time.time()
            self.redis.kill()
            time.sleep(self.mode.outage_s)
            self.redis.start()
            fault["back_at"] = time.time()
            fault["outage_s"] = round(fault["back_at"] - fault["at"], 2)
        return fault

    def _in_flight(self) -> list[str]:
        """Accepted jobs the subscription has not seen end (candidates for what a process is running)."""
        counts = self.listener.counts
        return [s["job_id"] for s in list(self.load.submissions)
                if s["job_id"] and not any(counts.get(s["job_id"], {}).get(st) for st in tally.FINAL)]

    def _running_on(self, job_ids: list[str], owned: Callable[[str], bool]) -> set[str]:
        """Of ``job_ids``, those whose record says running on a process ``owned`` accepts (by its worker id)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "status", "worker")
        found = set()
        for job_id, (status, worker) in zip(job_ids, pipe.execute()):
            if status == b"running" and worker and owned(worker.decode()):
                found.add(job_id)
        return found

    def _holdings(self, holders: list[str]) -> set[str]:
        """Job ids of what ``holders`` hold (``Keys.worker_deliveries``: tag -> "job id, task, fetch time")."""
        pipe = self.client.pipeline(transaction=False)
        for holder in holders:
            pipe.hvals(self.keys.worker_deliveries(holder))
        return {v.decode().split(" ", 1)[0] for values in pipe.execute() for v in values}

    def _busy(self, holders: list[str], wait_s: float, running_on: Callable[[str], bool] | None = None) -> None:
        """Wait (up to ``wait_s``) until one of ``holders`` holds a delivery, so that the kill hits work in hand.

        A batching consumer holds its batch from the fetch to the ack (milliseconds for small predicts): the
        holdings are polled every 2 ms. ``running_on`` also accepts a running record of a process it owns (a
        Celery pool child, whose deliveries its main process holds), checked every 20 ms.
        """
        deadline = time.monotonic() + wait_s
        n = 0
        while time.monotonic() < deadline:
            pipe = self.client.pipeline(transaction=False)
            for holder in holders:
                pipe.hlen(self.keys.worker_deliveries(holder))
            if any(pipe.execute()):
                return
            if running_on is not None and n % 10 == 0 and self._running_on(self._in_flight(), running_on):
                return
            n += 1
            time.sleep(0.002)

    def _kill_pool_process(self, worker: FleetWorker, fault: dict[str, Any]) -> None:
        """SIGKILL one process of ``worker``'s pool, once one holds work: the one holding most."""
        candidates = [(wid, pid_of(wid)) for wid in self._process_ids(worker, fresh_s=12)]
        candidates = [(wid, pid) for wid, pid in candidates if pid and worker.in_group(pid) and pid != worker.proc.pid]
        if not candidates:
            raise RuntimeError(f"no live pool process of {worker.name} to kill")
        ids = {wid for wid, _ in candidates}
        self._busy(sorted(ids), 3.0, running_on=lambda w: w in ids)
        in_flight = self._in_flight()
        held = {wid: self._holdings([wid]) | self._running_on(in_flight, lambda w, wid=wid: w == wid)
                for wid, _ in candidates}
        victim, pid = max(candidates, key=lambda c: len(held[c[0]]))
        fault.update(victim=victim, node=node_of(victim), pid=pid, held=sorted(held[victim]), at=time.time())
        os.kill(pid, signal.SIGKILL)

    def _kill_worker(self, worker: FleetWorker, fault: dict[str, Any]) -> None:
        """SIGKILL ``worker``'s whole process group at once (no supervisor left to give back), start another."""
        holders = [h.decode() for h in self.client.smembers(self.keys.delivery_holders()) if worker.owns(h.decode())]
        self._busy(holders, 3.0, running_on=worker.owns)
        fault["at"] = time.time()
        self.killed_workers.add(worker.index)
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.proc.wait(10)
        # Dead now: what it held is frozen in its holdings (and its running records) until the reaper comes.
        holders = [h.decode() for h in self.client.smembers(self.keys.delivery_holders()) if worker.owns(h.decode())]
        held = self._holdings(holders) | self._running_on(self._in_flight(), worker.owns)
        worker.proc.stop()
        new = self._start_worker()
        fault.update(node=f"{worker.name}@", holders=holders, held=sorted(held), replacement=new.name,
                     replacement_node=f"{new.name}@")

    def _plant_poison(self, fault: dict[str, Any]) -> None:
        fault["at"] = time.time()
        req = urllib.request.Request(f"{self.api.url}/v1/predict/batch", data=self.poison_body, method="POST",
                                     headers={"Content-Type": "application/msgpack", "X-API-Key": self.api.key})
        with urllib.request.urlopen(req, timeout=30) as resp:
            job_id = json.loads(resp.read())["job_id"]
        fault["job_id"] = job_id
        self.poison_id = job_id
        self.poison = PoisonKiller(redis.Redis.from_url(self.redis.url, socket_connect_timeout=0.5, socket_timeout=5),
                                   self.keys.job(job_id), self._may_signal, JOB_MAX_DELIVERIES)
        self.poison.start()

    # -- the end ---------------------------------------------------------------------------------------------
    def accepted_ids(self) -> list[str]:
        return [s["job_id"] for s in self.load.submissions if s["job_id"]]

    def _wait_final(self) -> None:
        """Until every accepted job (and the poison job) has a final record, or the deadline."""
        pending = set(self.accepted_ids()) | ({self.poison_id} if getattr(self, "poison_id", None) else set())
        deadline = time.monotonic() + self.mode.deadline_s
        last = 0.0
        while pending and time.monotonic() < deadline:
            self._check_processes()
            ids = sorted(pending)
            try:
                pipe = self.client.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(self.keys.job(job_id), "status")
                statuses = pipe.execute()
            except (redis.RedisError, OSError):
                time.sleep(0.5)
                continue
            pending -= {job_id for job_id, st in zip(ids, statuses) if st and st.decode() in tally.FINAL}
            if time.monotonic() - last > 10:
                self.log(f"waiting: {len(pending)} job(s) not final yet")
                last = time.monotonic()
            if pending:
                time.sleep(0.5)
        self.meta["unfinished_at_deadline"] = len(pending)
        self.meta["waited_s"] = round(time.time() - self.load_ended, 1)
        time.sleep(1.0)  # the last events are in flight to the subscription
        self.log(f"all jobs final ({self.meta['waited_s']} s after the last submission)" if not pending else
                 f"deadline: {len(pending)} job(s) still not final after {self.mode.deadline_s:.0f} s")

    def _collect(self) -> None:
        """Read every record, the jobs nobody was told about, the dead letters and the model's counter."""
        ids = self.accepted_ids() + ([self.poison_id] if getattr(self, "poison_id", None) else [])
        self.records = self._records(ids)
        known = set(ids)
        others = [k.decode()[len(self.keys.job("")):] for k in self.client.scan_iter(self.keys.job("*"), count=1000)]
        self.unknown = self._records([i for i in others if i not in known])
        raw_letters = self.client.lrange(self.keys.dead_letters(QUEUE), 0, -1)
        self.dead_letters = []
        for raw in raw_letters:
            try:
                self.dead_letters.append(json.loads(raw))
            except ValueError:
                self.dead_letters.append({"raw": raw.decode(errors="replace")})
        ok = self.client.hget(self.keys.model_stats(self.small_model_id), "ok")
        self.model_ok = int(ok) if ok is not None else None
        self.queue_left = {key: self.client.llen(key) for key in _queue_lists()}
        self.unacked_left = self.client.hlen("unacked")

    def _records(self, ids: list[str]) -> dict[str, dict[str, str] | None]:
        out: dict[str, dict[str, str] | None] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            pipe = self.client.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hgetall(self.keys.job(job_id))
            out.update({job_id: (_decode(raw) or None) for job_id, raw in zip(chunk, pipe.execute())})
        return out

    def _log_findings(self, log_dir: Path) -> dict[str, Any]:
        """Per process log: how many tracebacks and ERROR lines, and the first few of them."""
        found: dict[str, Any] = {}
        for path in sorted(log_dir.glob("*.log")) if log_dir.exists() else []:
            lines = path.read_text(errors="replace").splitlines()
            errors = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]
            found[path.stem] = {"tracebacks": sum(ln.startswith("Traceback") for ln in lines),
                                "error_lines": len(errors), "first": [ln[:300] for ln in errors[:8]]}
        return found

    def _tally(self) -> None:
        self.meta["load_started_at"] = self.load.started_at
        windows = tally.windows_of(self.load.started_at, self.faults)
        poison_id = getattr(self, "poison_id", None)
        counts = {job_id: dict(c) for job_id, c in self.listener.counts.items()}
        result = tally.tally_jobs(self.load.submissions, self.records, counts, windows,
                                  exclude=[poison_id] if poison_id else [])
        if self.poison is not None:
            for fault in self.faults:
                if fault["kind"] == "poison":
                    fault["kills"] = self.poison.kills
        for fault in self.faults:
            fault["recovery"] = tally.recovery(fault, jobs=result["jobs"], records=self.records,
                                               submissions=self.load.submissions, first_seen=self.monitor.first_seen,
                                               dead_letters=self.dead_letters)
            fault["at_s"] = round(fault["at"] - self.load.started_at, 3)
            if "held" in fault:
                fault["held_ids"] = fault.pop("held")[:50]
        unknown_status = Counter((r or {}).get("status", "missing") for r in self.unknown.values())
        unknown_ok = unknown_status.get("succeeded", 0)
        stats = tally.stats_check(self.model_ok, result["total"]["succeeded"] + unknown_ok)
        kills = Counter(f["node"] for f in self.faults if f["kind"] == "pool-kill")
        for kill in self.poison.kills if self.poison is not None else []:
            kills[node_of(kill["worker"])] += 1
        replaced = tally.unexplained_replacements(self.monitor.first_seen, self.per_node, kills)
        checks = {"stats": stats, "events_missed": tally.events_missed(result["jobs"]),
                  "event_gaps": [{"lost_s": round(a - self.load.started_at, 2),
                                  "back_s": round(b - self.load.started_at, 2) if b else None}
                                 for a, b in self.listener.gaps],
                  "event_messages": self.listener.messages,
                  "unknown_records": dict(unknown_status), "unexplained_replacements": replaced,
                  "queues_left": self.queue_left, "unacked_left": self.unacked_left,
                  "dead_letters": len(self.dead_letters)}
        problems = tally.verdict(result["total"], self.faults, stats)
        if replaced:
            problems["problems"].append(f"processes replaced without a kill: {replaced}")
            problems["ok"] = False
        result.pop("jobs")
        self.result = {"windows": result["windows"], "total": result["total"], "lost": result["lost"][:200],
                       "run_twice": result["run_twice"][:200], "failed": result["failed"][:200],
                       "succeeded_events_anomalies": result["succeeded_events_anomalies"][:200],
                       "checks": checks, "verdict": problems}


def _queue_lists() -> list[str]:
    from shared import routing

    return list(routing.redis_list_keys(QUEUE))
