"""The chaos run's accounting: pure functions from what was observed to what the report says.

Inputs, all plain data (what :mod:`bench.chaos.run` collected):

- ``submissions``: every ``POST /v1/predict`` the load generator made, ``{sent, answered, status, job_id}``
  (unix seconds; ``status`` 0 when no HTTP answer came; ``job_id`` only for a 202);
- ``records``: job id -> the job's record hash at the end (decoded strings), absent when Redis has none;
- ``events``: job id -> how many events of each status the ``<prefix>:job-events:*`` subscription saw;
- ``faults``: what was done and when, with what each fault's victim held (see :func:`recovery`);
- ``first_seen``: worker id -> when the monitor first saw it heart-beat (replacements are found there);
- ``dead_letters``: the pool's dead-letter entries at the end.

A job **accepted** is one that got a 202. It is **lost** when its record is missing at the end ("no record") or
not final by the deadline; **failed** when its record says failed (by error type); **run twice** when its record
counts more than one delivery *and* the subscription saw two or more ``succeeded`` events for it: two runs that
each stored their outcome (a redelivery whose first run never finished is not a double run). Because a
subscription misses what is published while it reconnects (the Redis restart), the per-job count is checked
against the model's own counter: the fleet adds one ``ok`` prediction to the model's stats hash in the same MULTI
that stores a result, so ``ok`` minus the distinct succeeded jobs is the number of extra executions, seen or not.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

FINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
#: Seconds before the Redis kill within which an accepted job may be lost by design: ``appendfsync everysec``
#: fsyncs once a second (a SIGKILLed process loses nothing written; a crashed machine up to this).
AOF_WINDOW_S = 1.0

Record = Mapping[str, str]


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def error_type(record: Record) -> str:
    """The error type a failed record names (``unknown`` when it names none)."""
    try:
        return str(json.loads(record.get("error") or "{}").get("type") or "unknown")
    except (ValueError, AttributeError):
        return "unknown"


def job_outcome(job_id: str, record: Record | None, events: Mapping[str, int] | None) -> dict[str, Any]:
    """What became of one accepted job: outcome (succeeded | failed | cancelled | lost), why it is lost, its
    deliveries, the ``succeeded`` events seen and whether it ran twice."""
    seen = dict(events or {})
    out: dict[str, Any] = {"job_id": job_id, "outcome": "lost", "lost_reason": None, "error_type": None,
                           "deliveries": 0, "succeeded_events": int(seen.get("succeeded", 0)), "run_twice": False,
                           "finished_at": None}
    if not record:
        out["lost_reason"] = "no record"
        return out
    status = record.get("status") or ""
    out["deliveries"] = int(_float(record.get("deliveries")) or 0)
    out["finished_at"] = _float(record.get("finished_at"))
    if status not in FINAL:
        out["lost_reason"] = f"still {status or 'without status'}"
        return out
    out["outcome"] = "succeeded" if status == "succeeded" else "cancelled" if status == "cancelled" else "failed"
    if status != "succeeded":
        out["error_type"] = error_type(record) if status == "failed" else status
    out["run_twice"] = out["deliveries"] > 1 and out["succeeded_events"] >= 2
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank-interpolated percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def windows_of(load_started: float, faults: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The fault windows: ``baseline`` from the start of the load, then one per fault from its time on."""
    out = [{"label": "baseline (no fault yet)", "kind": "baseline", "start": load_started}]
    out += [{"label": f["label"], "kind": f["kind"], "start": f["at"]} for f in faults]
    return out


def window_index(t: float, starts: Sequence[float]) -> int:
    """The window a time falls in (before the first start: the first window)."""
    return max(0, bisect.bisect_right(starts, t) - 1)


def _empty_row(label: str, kind: str, start_s: float) -> dict[str, Any]:
    return {"label": label, "kind": kind, "start_s": start_s, "accepted": 0, "refused": 0, "refused_by_status": {},
            "succeeded": 0, "failed": 0, "failed_by_type": {}, "cancelled": 0, "lost": 0, "lost_no_record": 0,
            "run_twice": 0, "redelivered": 0, "latency_s": {"p50": None, "p99": None, "max": None}}


def _add(row: dict[str, Any], job: Mapping[str, Any], latencies: list[float]) -> None:
    row["accepted"] += 1
    outcome = job["outcome"]
    if outcome == "succeeded":
        row["succeeded"] += 1
        if job.get("latency_s") is not None:
            latencies.append(job["latency_s"])
    elif outcome == "failed":
        row["failed"] += 1
        row["failed_by_type"][job["error_type"]] = row["failed_by_type"].get(job["error_type"], 0) + 1
    elif outcome == "cancelled":
        row["cancelled"] += 1
    else:
        row["lost"] += 1
        row["lost_no_record"] += job["lost_reason"] == "no record"
    row["run_twice"] += bool(job["run_twice"])
    row["redelivered"] += job["deliveries"] > 1


def _finish(row: dict[str, Any], latencies: list[float]) -> None:
    row["latency_s"] = {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                        "max": max(latencies) if latencies else None}


def tally_jobs(submissions: Iterable[Mapping[str, Any]], records: Mapping[str, Record | None],
               events: Mapping[str, Mapping[str, int]], windows: Sequence[Mapping[str, Any]],
               exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Per-window and total rows, and the job-level lists (lost, run twice, failed, redelivered).

    Args:
        submissions: The load generator's answers (see the module docstring).
        records: Job id -> record at the end.
        events: Job id -> event status -> count.
        windows: :func:`windows_of`; a job belongs to the window its 202 came in, a refusal to the one it was
            sent in.
        exclude: Job ids reported elsewhere (the poison job).
    """
    skip = set(exclude)
    load_started = windows[0]["start"]
    starts = [w["start"] for w in windows]
    rows = [_empty_row(w["label"], w["kind"], round(w["start"] - load_started, 2)) for w in windows]
    total = _empty_row("total", "total", 0.0)
    lat: list[list[float]] = [[] for _ in windows]
    lat_total: list[float] = []
    jobs: list[dict[str, Any]] = []
    for sub in submissions:
        if sub.get("status") != 202 or not sub.get("job_id"):
            i = window_index(sub["sent"], starts)
            key = str(sub.get("status") or "no answer")
            for row in (rows[i], total):
                row["refused"] += 1
                row["refused_by_status"][key] = row["refused_by_status"].get(key, 0) + 1
            continue
        if sub["job_id"] in skip:
            continue
        job = job_outcome(sub["job_id"], records.get(sub["job_id"]), events.get(sub["job_id"]))
        job["accepted_at"] = sub["answered"]
        job["window"] = window_index(sub["answered"], starts)
        if job["finished_at"] is not None and job["outcome"] == "succeeded":
            job["latency_s"] = max(0.0, job["finished_at"] - sub["answered"])
        jobs.append(job)
        _add(rows[job["window"]], job, lat[job["window"]])
        _add(total, job, lat_total)
    for row, values in zip(rows, lat):
        _finish(row, values)
    _finish(total, lat_total)

    def brief(job: Mapping[str, Any]) -> dict[str, Any]:
        return {"job_id": job["job_id"], "window": windows[job["window"]]["label"],
                "accepted_s": round(job["accepted_at"] - load_started, 3), "outcome": job["outcome"],
                "lost_reason": job["lost_reason"], "error_type": job["error_type"], "deliveries": job["deliveries"],
                "succeeded_events": job["succeeded_events"]}

    return {"windows": rows, "total": total, "jobs": jobs,
            "lost": [brief(j) for j in jobs if j["outcome"] == "lost"],
            "run_twice": [brief(j) for j in jobs if j["run_twice"]],
            "failed": [brief(j) for j in jobs if j["outcome"] in ("failed", "cancelled")],
            # two or more succeeded events while the record counts one delivery: not a redelivery, yet stored
            # twice (it should not happen at all; listed apart so that it cannot hide)
            "succeeded_events_anomalies": [brief(j) for j in jobs if j["succeeded_events"] >= 2 and not j["run_twice"]]}


# -- recovery per fault ----------------------------------------------------------------------------------------
def _success_times(jobs: Iterable[Mapping[str, Any]]) -> list[float]:
    return sorted(j["finished_at"] for j in jobs if j["outcome"] == "succeeded" and j["finished_at"] is not None)


def _first_after(times: Sequence[float], t: float) -> float | None:
    i = bisect.bisect_right(times, t)
    return times[i] if i < len(times) else None


def _since(later: float | None, t: float) -> float | None:
    return None if later is None else round(later - t, 3)


def _held(held: Iterable[str], records: Mapping[str, Record | None], t: float) -> dict[str, Any]:
    """How the jobs a killed process (or worker) held ended: counts and the time the last one ended."""
    ids = sorted(set(held))
    outcomes = [job_outcome(i, records.get(i), None) for i in ids]
    final = [o for o in outcomes if o["outcome"] != "lost"]
    ends = [o["finished_at"] for o in final if o["finished_at"] is not None]
    succeeded = [o for o in final if o["outcome"] == "succeeded"]
    # NOTE: the snapshot is taken a few milliseconds before the kill: a job that ended in between ended before it.
    return {"held": len(ids), "held_succeeded": len(succeeded),
            "held_ended_before_kill": sum(1 for e in ends if e <= t),
            "held_failed": {k: v for k, v in Counter(o["error_type"] for o in final
                                                     if o["outcome"] != "succeeded").items()},
            "held_lost": len(outcomes) - len(final),
            "held_ended_s": _clamped(_since(max(ends), t)) if ends and len(final) == len(outcomes) else None,
            "held_first_success_s": _clamped(_since(min((o["finished_at"] for o in succeeded if o["finished_at"]),
                                                        default=None), t))}


def _clamped(value: float | None) -> float | None:
    return None if value is None else max(0.0, value)


def _replaced(first_seen: Mapping[str, float], node: str | None, t: float) -> float | None:
    """Seconds from ``t`` to the first worker id of ``node`` (a node name, or the start of one: a new worker's
    ``<name>@``) first seen after ``t``."""
    if not node:
        return None
    later = [seen for wid, seen in first_seen.items() if wid.rsplit("|", 1)[0].startswith(node) and seen > t]
    return _since(min(later), t) if later else None


def recovery(fault: Mapping[str, Any], *, jobs: Sequence[Mapping[str, Any]], records: Mapping[str, Record | None],
             submissions: Sequence[Mapping[str, Any]], first_seen: Mapping[str, float],
             dead_letters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How long ``fault`` took to recover from, and what its victim's jobs became.

    Every kind gets ``next_success_s`` (the fault to the next job that succeeded anywhere) and a headline
    ``recovery_s`` with ``recovery_what`` saying what it measures:

    - ``pool-kill`` (``victim``, ``node``, ``held``): until every job the killed process held had ended (all
      succeeded, elsewhere); ``replaced_s``: until a new process of that worker heart-beat;
    - ``worker-kill`` (``node``, ``held``, ``replacement_node``): until every job the lost worker held, given back
      by the reaper, had ended; ``replaced_s``: until the new worker heart-beat;
    - ``poison`` (``job_id``, ``kills``): until the poison job's record was final (PoisonJobError expected);
    - ``malformed`` (``marker``): until its dead letter was written (``dead_at``);
    - ``redis-restart`` (``back_at``): from Redis answering again to the first 202, and to the next success.
    """
    t = fault["at"]
    times = _success_times(jobs)
    out: dict[str, Any] = {"next_success_s": _since(_first_after(times, t), t)}
    kind = fault["kind"]
    if kind in ("pool-kill", "worker-kill"):
        out.update(_held(fault.get("held", ()), records, t))
        out["replaced_s"] = _replaced(first_seen, fault.get("replacement_node") or fault.get("node"), t)
        if out["held"]:
            out["recovery_s"] = out["held_ended_s"]
            out["recovery_what"] = ("every job the killed process held ended" if kind == "pool-kill" else
                                    "every job the lost worker held ended (given back by the reaper)")
        else:
            out["recovery_s"] = out["next_success_s"]
            out["recovery_what"] = "next job succeeded (the victim held none)"
    elif kind == "poison":
        job = job_outcome(fault["job_id"], records.get(fault["job_id"]), None)
        record = records.get(fault["job_id"]) or {}
        letter = next((d for d in dead_letters if d.get("job_id") == fault["job_id"]), None)
        try:
            message = json.loads(record.get("error") or "{}").get("message", "")
        except ValueError:
            message = ""
        out.update(status=record.get("status", "missing"), error_type=job["error_type"], message=message[:300],
                   deliveries=job["deliveries"], kills=len(fault.get("kills", ())),
                   dead_letter=letter is not None, dead_letter_reason=letter.get("reason") if letter else None,
                   recovery_s=_since(job["finished_at"], t) if job["outcome"] != "lost" else None,
                   recovery_what="the poison job's record was final")
        out["as_expected"] = bool(job["error_type"] == "PoisonJobError" and letter and letter.get("reason") == "poison")
    elif kind == "malformed":
        letter = next((d for d in dead_letters if fault["marker"] in str(d.get("raw", ""))), None)
        out.update(dead_letter=letter is not None, reason=letter.get("reason") if letter else None,
                   error_type=(letter.get("error") or {}).get("type") if letter else None,
                   recovery_s=_since(_float(letter.get("dead_at")), t) if letter else None,
                   recovery_what="its dead letter was written")
        out["as_expected"] = bool(letter and letter.get("reason") == "unreadable")
    elif kind == "redis-restart":
        back = fault.get("back_at")
        out["outage_s"] = _since(back, t)
        if back is not None:
            ok = sorted(s["answered"] for s in submissions if s.get("status") == 202 and s["answered"] >= back)
            first_202 = ok[0] if ok else None
            refused_until = first_202 if first_202 is not None else math.inf
            out["first_202_s"] = _since(first_202, back)
            out["next_success_after_back_s"] = _since(_first_after(times, back), back)
            out["refused_during"] = sum(1 for s in submissions
                                        if s.get("status") != 202 and t <= s["sent"] <= refused_until)
            out["recovery_s"] = out["first_202_s"]
            out["recovery_what"] = "Redis answering again to the API's first 202"
            # jobs accepted just before the kill: the only ones AOF everysec may lose by design
            out["accepted_in_aof_window"] = sum(1 for s in submissions if s.get("status") == 202
                                                and t - AOF_WINDOW_S <= s["answered"] <= t)
    return out


def stats_check(model_ok: int | None, succeeded_distinct: int) -> dict[str, Any]:
    """The model's ``ok`` counter against the distinct succeeded jobs: their difference is extra executions."""
    if model_ok is None:
        return {"model_ok": None, "succeeded_distinct": succeeded_distinct, "extra_executions": None}
    return {"model_ok": model_ok, "succeeded_distinct": succeeded_distinct,
            "extra_executions": model_ok - succeeded_distinct}


def events_missed(jobs: Iterable[Mapping[str, Any]]) -> int:
    """Succeeded jobs (by their record) whose ``succeeded`` event the subscription never saw."""
    return sum(1 for j in jobs if j["outcome"] == "succeeded" and j["succeeded_events"] == 0)


def verdict(total: Mapping[str, Any], faults: Sequence[Mapping[str, Any]], stats: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the run shows a reliability problem, and each reason it does."""
    problems = []
    if total["lost"]:
        problems.append(f"{total['lost']} accepted job(s) lost")
    if total["run_twice"]:
        problems.append(f"{total['run_twice']} job(s) run twice")
    if stats.get("extra_executions"):
        problems.append(f"{stats['extra_executions']} extra execution(s) by the model's counter")
    if total["failed"] or total["cancelled"]:
        problems.append(f"{total['failed'] + total['cancelled']} job(s) failed: {total['failed_by_type']}")
    for fault in faults:
        rec = fault.get("recovery", {})
        if fault["kind"] in ("poison", "malformed") and not rec.get("as_expected"):
            problems.append(f"{fault['label']}: not handled as expected ({rec})")
        if rec.get("recovery_s") is None:
            problems.append(f"{fault['label']}: no recovery observed")
    return {"ok": not problems, "problems": problems}


def unexplained_replacements(first_seen: Mapping[str, float], per_node: int,
                             kills_by_node: Mapping[str, int]) -> dict[str, int]:
    """Nodes that heart-beat under more process ids than they started with plus the processes the run killed
    there: each extra id is a process that died (and was replaced) without a kill, a consumer that crashed."""
    ids_by_node = Counter(wid.rsplit("|", 1)[0] for wid in first_seen)
    extra = {node: n - per_node - kills_by_node.get(node, 0) for node, n in ids_by_node.items()}
    return {node: n for node, n in sorted(extra.items()) if n > 0}
