"""The chaos run's Markdown report and JSON dump, named like the benchmark's (``<date>-<host>-chaos``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from bench.report import _clean, _json_default, _table, result_stem

METHOD = (
    "A job is **accepted** when the API answered 202; anything else (a 503 while Redis is down, no answer) is "
    "**refused** and submitted again as a new job. After the last submission every accepted job has the deadline "
    "to reach a final record. **Lost**: no record at all at the end, or one that is not final by the deadline. "
    "**Failed**: its record says failed (counted by error type). **Run twice**: its record counts more than one "
    "delivery *and* the `<prefix>:job-events:*` subscription (PSUBSCRIBEd before the first submission) saw two or "
    "more `succeeded` events for it — two runs that each stored an outcome; a redelivered job whose first run "
    "never finished is **redelivered**, not run twice. The subscription misses what is published while it "
    "reconnects after the Redis restart, so the count is checked against the model's own `ok` counter, which "
    "the fleet increments in the MULTI that stores each result: `ok` minus the distinct succeeded jobs is the "
    "number of extra executions, seen or not. Windows: a job belongs to the window its 202 came in (a refusal to "
    "the one it was sent in); each fault's window runs until the next fault. The poison job and the malformed "
    "message are expected failures, reported apart.")


def _s(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _types(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "–"


def _latency(lat: Mapping[str, Any]) -> str:
    """p50 / p99 / max of seconds, in milliseconds."""
    ms = {k: (None if v is None else v * 1000) for k, v in lat.items()}
    return f"{_s(ms.get('p50'), 0)} / {_s(ms.get('p99'), 0)} / {_s(ms.get('max'), 0)}"


def _cell(text: Any) -> str:
    """A table cell: worker ids hold ``|``, which would end the cell (even inside backticks)."""
    return str(text).replace("|", "\\|")


def _detail(fault: Mapping[str, Any]) -> str:
    kind = fault["kind"]
    if kind == "pool-kill":
        return f"`{fault.get('victim')}` (pid {fault.get('pid')})"
    if kind == "worker-kill":
        return f"`{fault.get('node')}*` killpg; new worker `{fault.get('replacement')}`"
    if kind == "poison":
        return f"job `{fault.get('job_id')}`, {len(fault.get('kills', []))} kill(s)"
    if kind == "malformed":
        return f"`{fault.get('marker')} {{not json` LPUSHed raw"
    if kind == "redis-restart":
        return f"down {_s(fault.get('outage_s'), 2)} s"
    return ""


def render_markdown(run: Mapping[str, Any]) -> str:
    meta, plan = run["meta"], run["plan"]
    total = run.get("total")
    engine = meta.get("engine", "batching")
    lines = [f"# FinSight Fleet chaos run — {meta['started_at'][:10]} on {meta['host']} ({engine} engine)", ""]
    lines += [f"- Mode: **{meta['mode']}**, {plan['jobs']:,} predict jobs over HTTP (`POST /v1/predict`, no wait) at "
              f"{plan['rate_per_s']:.0f}/s, at most {plan['in_flight']} in flight; run took "
              f"{meta.get('duration_s', 0):.0f} s; commit `{meta.get('commit')}`"
              f"{' (with uncommitted changes)' if meta.get('dirty') else ''}",
              f"- Machine: {meta.get('cpu')}, {meta.get('cpu_count')} cores; Python {meta.get('python')}, torch "
              f"{meta.get('torch')}; load average at start {_load(meta.get('loadavg_start'))}, at end "
              f"{_load(meta.get('loadavg_end'))}",
              f"- Fleet on loopback: {plan['workers']} x `fleet worker --engine {engine} -c {plan['concurrency']}`, "
              f"`fleet api` (keys on), redis-server with AOF (`appendfsync everysec`); "
              + ", ".join(f"{k}={v}" for k, v in plan["env"].items()),
              f"- Jobs: the benchmark's small PatchTST (96 x 5 -> 24, random-init, msgpack tensors); the poison job "
              f"is a batch of {plan['poison']['items']} x {plan['poison']['n_steps']} steps of the reference model, "
              f"its process SIGKILLed a quarter second into each of its first JOB_MAX_DELIVERIES runs (whenever its "
              f"record says running)"]
    lines += [f"- {note}" for note in meta.get("mode_notes", [])]
    verdict = run.get("verdict")
    if verdict is not None:
        lines.append("- **Verdict: no accepted job lost, none run twice, no unexpected failure; every fault "
                     "recovered.**" if verdict["ok"] else
                     "- **Verdict: problems found:** " + "; ".join(verdict["problems"]))
    if meta.get("orphans"):
        lines.append(f"- WARNING: processes left behind after the run: {meta['orphans']}")

    if total is not None:
        lines += ["", "## Totals", ""]
        lines += _table(["accepted", "succeeded", "failed", "lost (no record)", "run twice", "redelivered",
                         "refused", "latency ms p50 / p99 / max"],
                        [[f"{total['accepted']:,}", f"{total['succeeded']:,}",
                          f"{total['failed'] + total['cancelled']}"
                          + (f" ({_types(total['failed_by_type'])})" if total["failed"] else ""),
                          f"{total['lost']} ({total['lost_no_record']})", str(total["run_twice"]),
                          str(total["redelivered"]),
                          f"{total['refused']} ({_types(total['refused_by_status'])})", _latency(total["latency_s"])]])
        lines += ["", "Latency: 202 to the record's `finished_at`, succeeded jobs."]

    lines += ["", "## Faults and recovery", ""]
    rows = []
    for f in run["faults"]:
        rec = f.get("recovery", {})
        held = (f"{rec.get('held', 0)} ({rec.get('held_succeeded', 0)} succeeded"
                + (f", {rec['held_lost']} lost" if rec.get("held_lost") else "")
                + (f", {rec['held_ended_before_kill']} had ended as it was killed"
                   if rec.get("held_ended_before_kill") else "")
                + (f", failed {_types(rec['held_failed'])}" if rec.get("held_failed") else "") + ")"
                if "held" in rec else "–")
        extra = []
        if rec.get("replaced_s") is not None:
            extra.append(f"replacement heart-beat after {_s(rec['replaced_s'])} s")
        if f["kind"] == "redis-restart":
            extra.append(f"{rec.get('refused_during', 0)} refused; next success "
                         f"{_s(rec.get('next_success_after_back_s'), 2)} s after its return; "
                         f"{rec.get('accepted_in_aof_window', 0)} accepted in the last second before the kill")
        rows.append([_s(f.get("at_s")), f["label"], _cell(_detail(f)), held, f"**{_s(rec.get('recovery_s'), 2)}**",
                     rec.get("recovery_what", ""), _s(rec.get("next_success_s"), 2), "; ".join(extra) or "–"])
    lines += _table(["at s", "fault", "victim / detail", "jobs it held (how they ended)", "recovery s",
                     "recovery is", "next success s", "also"], rows)

    if run.get("windows"):
        lines += ["", "## Per fault window", ""]
        lines += _table(["window", "from s", "accepted", "refused", "succeeded", "failed (by type)", "lost (no record)",
                         "run twice", "redelivered", "latency ms p50 / p99 / max"],
                        [[w["label"], _s(w["start_s"]), f"{w['accepted']:,}", str(w["refused"]),
                          f"{w['succeeded']:,}", f"{w['failed'] + w['cancelled']}"
                          + (f" ({_types(w['failed_by_type'])})" if w["failed"] else ""),
                          f"{w['lost']} ({w['lost_no_record']})", str(w["run_twice"]), str(w["redelivered"]),
                          _latency(w["latency_s"])] for w in run["windows"]])

    poison = next((f for f in run["faults"] if f["kind"] == "poison"), None)
    malformed = next((f for f in run["faults"] if f["kind"] == "malformed"), None)
    lines += ["", "## Expected failures (not counted as failed)", ""]
    if poison is not None:
        rec = poison.get("recovery", {})
        letter = f"yes ({rec.get('dead_letter_reason')})" if rec.get("dead_letter") else "no"
        lines.append(f"- Poison job `{poison.get('job_id')}`: {rec.get('status')} with {rec.get('error_type')} "
                     f"(\"{rec.get('message', '')}\") after {rec.get('deliveries')} deliveries, its process killed "
                     f"{rec.get('kills')} time(s); dead letter: {letter}; "
                     f"final {_s(rec.get('recovery_s'), 2)} s after it was planted — "
                     f"{'as expected' if rec.get('as_expected') else '**not as expected**'}.")
    if malformed is not None:
        rec = malformed.get("recovery", {})
        lines.append(f"- Malformed message: dead letter {'written' if rec.get('dead_letter') else '**missing**'}"
                     f" (reason {rec.get('reason')}, {rec.get('error_type')}) {_s(rec.get('recovery_s'), 2)} s after "
                     f"the push — {'as expected' if rec.get('as_expected') else '**not as expected**'}.")

    checks = run.get("checks")
    if checks:
        stats = checks["stats"]
        gaps = ", ".join(f"{_s(g['lost_s'])}-{_s(g['back_s'])} s" for g in checks["event_gaps"]) or "none"
        lines += ["", "## Checks", ""]
        lines += [f"- Model counter: `ok` = {stats['model_ok']} for {stats['succeeded_distinct']} distinct succeeded "
                  f"jobs: **{stats['extra_executions']} extra execution(s)**.",
                  f"- Events: {checks['event_messages']:,} seen; subscription gaps (s from the start of the load): "
                  f"{gaps}; {checks['events_missed']} succeeded job(s) whose `succeeded` event was not seen.",
                  f"- Records of submissions whose 202 never arrived: {checks['unknown_records'] or 'none'}.",
                  f"- Left at the end: queue lists {checks['queues_left']}, `unacked` {checks['unacked_left']}, "
                  f"{checks['dead_letters']} dead letter(s).",
                  f"- Processes replaced without a kill (a consumer that crashed): "
                  f"{checks['unexplained_replacements'] or 'none'}."]
    logs = meta.get("logs") or {}
    if logs:
        lines.append("- Logs: " + "; ".join(f"{name} {v['tracebacks']} traceback(s), {v['error_lines']} ERROR line(s)"
                                             for name, v in logs.items()) + ".")
    def nearest(job: Mapping[str, Any]) -> str:
        """The fault closest in time to the job's 202 (a job lost at a kill is accepted within milliseconds of it)."""
        timed = [f for f in run["faults"] if f.get("at_s") is not None]
        if not timed:
            return "–"
        f = min(timed, key=lambda f: abs(job["accepted_s"] - f["at_s"]))
        return _cell(f"{f['label']} ({job['accepted_s'] - f['at_s']:+.3f} s)")

    for title, key in (("Lost jobs", "lost"), ("Jobs run twice", "run_twice"), ("Failed jobs", "failed"),
                       ("Two succeeded events, one delivery", "succeeded_events_anomalies")):
        jobs = run.get(key) or []
        if jobs:
            lines += ["", f"## {title} ({len(jobs)}{'+' if len(jobs) >= 200 else ''})", ""]
            lines += _table(["job", "window", "accepted s", "nearest fault (202 - fault)", "outcome", "why",
                             "deliveries", "succeeded events"],
                            [[f"`{j['job_id']}`", _cell(j["window"]), _s(j["accepted_s"], 3), nearest(j), j["outcome"],
                              j["lost_reason"] or j["error_type"] or "", str(j["deliveries"]),
                              str(j["succeeded_events"])] for j in jobs[:50]])
    lines += ["", "## How it is measured", "", METHOD]
    if run.get("failures"):
        lines += ["", "## Failures", ""]
        lines += [f"- {f['step']}: `{f['error']}`" for f in run["failures"]]
    lines.append("")
    return "\n".join(lines)


def _load(value: Any) -> str:
    if not value:
        return "?"
    return ", ".join(f"{v:.2f}" for v in value)


def stem(run: Mapping[str, Any]) -> str:
    """``<date>-<host>-chaos``, with ``-celery`` for the Celery engine and ``-quick`` for a quick run."""
    meta = run["meta"]
    out = f"{result_stem(meta['host'])}-chaos"
    out += "-celery" if meta.get("engine") == "celery" else ""
    return out + ("-quick" if meta.get("mode") == "quick" else "")


def write(run: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(run)
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json"}
    paths["md"].write_text(render_markdown(run), encoding="utf-8")
    paths["json"].write_text(json.dumps(_clean(run), indent=2, default=_json_default, allow_nan=False) + "\n",
                             encoding="utf-8")
    return paths


def summary(run: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal: totals, each fault's recovery, the verdict."""
    total = run.get("total")
    if total is None:
        return ["chaos run failed before its tally: " + "; ".join(f["error"] for f in run.get("failures", []))]
    out = [f"accepted {total['accepted']}, succeeded {total['succeeded']}, failed {total['failed']} "
           f"{_types(total['failed_by_type'])}, lost {total['lost']} ({total['lost_no_record']} without a record), "
           f"run twice {total['run_twice']}, redelivered {total['redelivered']}, refused {total['refused']}"]
    for f in run["faults"]:
        rec = f.get("recovery", {})
        out.append(f"  {_s(f.get('at_s')):>6} s  {f['label']}: recovered in {_s(rec.get('recovery_s'), 2)} s "
                   f"({rec.get('recovery_what', '')})")
    checks = run.get("checks") or {}
    if checks:
        out.append(f"model counter: {checks['stats']['extra_executions']} extra execution(s); "
                   f"{checks['events_missed']} succeeded event(s) not seen")
    verdict = run.get("verdict") or {}
    out.append("verdict: OK" if verdict.get("ok") else f"verdict: PROBLEMS: {'; '.join(verdict.get('problems', []))}")
    return out
