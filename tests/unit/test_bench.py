"""The benchmark's pure helpers: percentiles, window summaries, medians, targets and results writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import report
from bench.config import BATCH_JOB_SIZE, FULL, QUICK, SATURATION_CONCURRENCY as SAT
from bench.runner import plan
from bench.stats import Window, median_summary, percentile, ratio, summarize


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summary_counts_predictions_and_cpu_per_thousand() -> None:
    window = Window(seconds=2.0, latencies_ms=[10.0] * 99 + [100.0], errors=3, items_per_request=64,
                    server_cpu_s=3.2, client_cpu_s=0.64, other_cpu_s=0.5)
    s = summarize(window)
    assert s["completed"] == 6400
    assert s["throughput"] == pytest.approx(3200.0)
    assert s["p50_ms"] == 10.0
    assert s["p99_ms"] == pytest.approx(10.9)
    assert s["cpu_per_1k_s"] == pytest.approx(0.5)
    assert s["client_cpu_per_1k_s"] == pytest.approx(0.1)
    assert s["other_load"] == pytest.approx(0.25)
    assert s["errors"] == 3


def test_summary_of_an_empty_window_is_nan_not_an_error() -> None:
    s = summarize(Window(seconds=1.0, errors=5, first_error="RuntimeError: boom"))
    assert s["throughput"] == 0.0
    assert math.isnan(s["p50_ms"]) and math.isnan(s["cpu_per_1k_s"])
    assert s["first_error"] == "RuntimeError: boom"


def test_median_over_repetitions_ignores_missing_values() -> None:
    reps = [{"throughput": 10.0, "p99_ms": math.nan}, {"throughput": 30.0, "p99_ms": 5.0},
            {"throughput": 20.0, "p99_ms": 7.0}]
    m = median_summary(reps)
    assert m["throughput"] == 20.0
    assert m["p99_ms"] == 6.0
    assert math.isnan(m["p50_ms"])


def test_ratio_is_nan_when_a_side_is_missing() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(3.0, 0.0))
    assert math.isnan(ratio(None, 2.0))
    assert math.isnan(ratio(math.nan, 2.0))


def rec(system: str, model: str = "ref", concurrency: int = SAT, throughput: float = 100.0, p50: float = 10.0,
        p99: float = 100.0, kind: str = "predict", pattern: str = "closed", variant: str = "",
        encoding: str = "msgpack-tensor") -> dict:
    return {"system": system, "name": system, "variant": variant, "model": model, "encoding": encoding,
            "pattern": pattern, "concurrency": concurrency, "rate": 0.0, "kind": kind, "items": 1,
            "throughput": throughput, "p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "mean_ms": p50,
            "cpu_per_1k_s": 1.0, "client_cpu_per_1k_s": 0.1, "other_load": 0.0, "completed": 100, "errors": 0,
            "seconds": 1.0, "reps": [{}]}


def records() -> list[dict]:
    return [
        rec("a", concurrency=32, throughput=1000.0, pattern="inprocess", kind="forward", variant="1x2"),
        rec("a", concurrency=1, throughput=150.0, p50=6.0, pattern="inprocess", kind="forward", variant="1x1"),
        rec("a", model="small", concurrency=64, throughput=9000.0, pattern="inprocess", kind="forward"),
        rec("b", throughput=300.0), rec("b", model="small", throughput=1000.0),
        rec("b2", throughput=500.0),
        rec("c", throughput=800.0, variant="batching"), rec("c", throughput=600.0, variant="celery"),
        rec("c", concurrency=1, throughput=90.0, p50=8.5), rec("c", concurrency=1, throughput=80.0, p50=12.0),
        rec("c", concurrency=4, kind="batch", throughput=950.0),
        rec("c", model="small", throughput=2500.0),
        rec("d", throughput=700.0, p99=150.0), rec("d", concurrency=8, throughput=900.0, p99=20.0),
        rec("e", throughput=650.0, p99=200.0), rec("f", throughput=500.0, p99=120.0),
        rec("g", throughput=640.0, p99=90.0), rec("h", throughput=660.0, p99=110.0),
    ]


def test_targets_use_the_best_configuration_and_report_margins() -> None:
    targets = {t["id"]: t for t in report.compute_targets(records())}
    assert targets["c-vs-a"]["measured"] == 800.0 and targets["c-vs-a"]["target"] == 700.0
    assert targets["c-vs-a"]["status"] == "PASS"
    assert targets["c-vs-b"]["status"] == "PASS"  # 800 >= 1.9 x 300
    assert targets["c-vs-b2"]["status"] == "PASS"  # 800 >= 1.25 x 500
    assert targets["c-batch-vs-a"]["status"] == "PASS"  # 950 >= 900
    c1 = targets["c-c1-p50"]
    assert c1["measured"] == 8.5 and c1["target"] == 9.0 and c1["status"] == "PASS"
    small = targets["c-small-vs-b"]
    assert small["status"] == "MISS" and "missed by 17 %" in small["margin"]
    # (d) is compared at the saturation concurrency only, not at its best concurrency
    assert targets["d-vs-f"]["measured"] == 700.0 and targets["d-vs-f"]["status"] == "PASS"
    assert targets["d-vs-e"]["status"] == "PASS"
    assert targets["d-p99-vs-e"]["status"] == "PASS"
    assert targets["d-p99-vs-f"]["status"] == "MISS" and targets["d-p99-vs-f"]["margin"] == "missed by 30.0 ms"
    # (g) the fleet's OIP gRPC against (h) Triton's gRPC, both through tritonclient.grpc
    assert targets["g-vs-h"]["measured"] == 640.0 and targets["g-vs-h"]["status"] == "MISS"
    assert targets["g-p99-vs-h"]["status"] == "PASS"


def test_targets_without_measurements_are_not_applicable() -> None:
    targets = report.compute_targets([rec("a", pattern="inprocess", kind="forward")])
    assert {t["status"] for t in targets} == {"N/A"}


def test_write_produces_markdown_json_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "plot", lambda records, path: path.write_bytes(b"png"))
    run = {"meta": {"host": "bench host/1", "started_at": "2026-01-02 03:04:05 +0000", "mode": "quick",
                    "mode_notes": ["quick mode: 1 repetition"], "cores": {"server": "shared", "client": "shared"},
                    "models": {}, "encodings": [{"form": "json-list", "bytes": 100, "encode_us": 5.0,
                                                  "decode_us": 4.0},
                                                 {"form": "msgpack", "bytes": 20, "encode_us": 1.0, "decode_us": 1.0}],
                    "loadavg_start": (0.1, 0.1, 0.1), "orphans": []},
           "records": records(), "systems": [{"system": "b", "name": "plain", "variant": "", "notes": ["n"]}],
           "failures": []}
    paths = report.write(run, tmp_path)
    assert paths["md"].name.endswith("-bench-host-1.md") and paths["png"].read_bytes() == b"png"
    md = paths["md"].read_text()
    assert "## Targets" in md and "**MISS**" in md and "What limits it" in md
    assert "serving, not accuracy" in md and "quick mode: 1 repetition" in md
    assert "| msgpack | 20 | 0.20x |" in md
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert len(data["records"]) == len(records()) and len(data["targets"]) == 18  # 12 + 6 (default config)


def test_quick_plan_is_a_subset_of_the_full_plan() -> None:
    for system in ("b", "b2", "c", "d", "e", "f"):
        quick = {p.label for p in plan(system, QUICK, "celery")}
        full = {p.label for p in plan(system, FULL, "celery")}
        assert quick and quick <= full, system
    batch = [p for p in plan("c", FULL, "celery") if p.kind == "batch"]
    assert batch and batch[0].items == BATCH_JOB_SIZE


# -- the chaos run's accounting (bench.chaos): fake records and events, no servers -------------------------------
T0 = 1_000.0


def chaos_record(status: str, deliveries: int = 1, finished: float | None = None, error: str | None = None) -> dict:
    rec = {"status": status, "deliveries": str(deliveries), "kind": "predict"}
    if finished is not None:
        rec["finished_at"] = str(finished)
    if error:
        rec["error"] = json.dumps({"type": error, "message": "boom"})
    return rec


def chaos_faults() -> list[dict]:
    return [{"kind": "pool-kill", "label": "pool kill", "at": T0 + 10, "victim": "w1@h|11", "node": "w1@h",
             "held": ["j4", "j5"]},
            {"kind": "worker-kill", "label": "worker kill", "at": T0 + 15, "node": "w2@", "held": ["j6"],
             "replacement_node": "w3@"},
            {"kind": "poison", "label": "poison", "at": T0 + 16, "job_id": "poison", "kills": [{}, {}, {}]},
            {"kind": "malformed", "label": "malformed", "at": T0 + 18, "marker": "junk-1"},
            {"kind": "redis-restart", "label": "redis", "at": T0 + 20, "back_at": T0 + 23}]


def chaos_inputs() -> tuple[list[dict], dict, dict]:
    def ok(job_id: str, sent: float) -> dict:
        return {"sent": sent, "answered": sent + 0.01, "status": 202, "job_id": job_id}
    submissions = [ok("j1", T0 + 1), ok("j2", T0 + 2), ok("j3", T0 + 11), ok("j4", T0 + 12), ok("j5", T0 + 13),
                   ok("j6", T0 + 14), ok("poison", T0 + 16),
                   {"sent": T0 + 21, "answered": T0 + 21.5, "status": 503, "job_id": None},
                   {"sent": T0 + 22, "answered": T0 + 32, "status": 0, "job_id": None},
                   ok("j7", T0 + 24), ok("j8", T0 + 25)]
    records = {"j1": chaos_record("succeeded", finished=T0 + 1.5), "j2": None, "j3": chaos_record("queued", 0),
               "j4": chaos_record("succeeded", 2, finished=T0 + 12.5),
               "j5": chaos_record("succeeded", 2, finished=T0 + 13.5),
               "j6": chaos_record("failed", finished=T0 + 14.5, error="ModelNotFoundError"),
               "poison": chaos_record("failed", 4, finished=T0 + 19, error="PoisonJobError"),
               "j7": chaos_record("succeeded", finished=T0 + 24.5), "j8": chaos_record("succeeded", finished=T0 + 26)}
    events = {"j1": {"queued": 1, "running": 1, "succeeded": 1}, "j4": {"running": 2, "succeeded": 2},
              "j5": {"running": 2, "succeeded": 1}, "j7": {"succeeded": 1}, "j8": {"succeeded": 2}}
    return submissions, records, events


def test_chaos_timeline_orders_the_faults_and_paces_the_load_over_it() -> None:
    from bench.chaos.plan import FAULT_KINDS, FULL, QUICK, planned_seconds, submit_rate, timeline

    for mode in (QUICK, FULL):
        steps = timeline(mode)
        kinds = [s.kind for s in steps]
        assert kinds == ["pool-kill"] * mode.pool_kills + list(FAULT_KINDS[1:])
        offsets = [s.at_s for s in steps]
        assert offsets == sorted(offsets) and offsets[0] == mode.baseline_s
        # the reaper (WORKER_LOST_AFTER_SECONDS=5, a round every 5 s) gets more than a plain gap
        worker = kinds.index("worker-kill")
        assert offsets[worker + 1] - offsets[worker] >= 10
        assert submit_rate(mode) == pytest.approx(mode.jobs / planned_seconds(mode))
    assert QUICK.jobs == 1_500 and FULL.jobs == 10_000 and planned_seconds(QUICK) < planned_seconds(FULL)


def test_chaos_tally_counts_lost_run_twice_and_failed_jobs_per_window() -> None:
    from bench.chaos import tally

    submissions, records, events = chaos_inputs()
    windows = tally.windows_of(T0, chaos_faults())
    out = tally.tally_jobs(submissions, records, events, windows, exclude=["poison"])
    total = out["total"]
    assert total["accepted"] == 8  # the poison job is reported apart; refusals are not accepted
    assert (total["succeeded"], total["failed"], total["lost"], total["lost_no_record"]) == (5, 1, 2, 1)
    assert total["failed_by_type"] == {"ModelNotFoundError": 1}
    # j4 ran twice to effect (two deliveries, two succeeded events); j5 was redelivered but stored once; j8's two
    # events with one delivery are an anomaly, listed apart, not a double run
    assert total["run_twice"] == 1 and [j["job_id"] for j in out["run_twice"]] == ["j4"]
    assert total["redelivered"] == 2
    assert [j["job_id"] for j in out["succeeded_events_anomalies"]] == ["j8"]
    assert {j["job_id"]: j["lost_reason"] for j in out["lost"]} == {"j2": "no record", "j3": "still queued"}
    assert total["refused"] == 2 and total["refused_by_status"] == {"503": 1, "no answer": 1}
    rows = {row["kind"]: row for row in out["windows"]}
    assert [r["accepted"] for r in out["windows"]] == [2, 4, 0, 0, 0, 2]
    assert rows["baseline"]["lost_no_record"] == 1 and rows["pool-kill"]["run_twice"] == 1
    assert rows["redis-restart"]["refused"] == 2 and rows["redis-restart"]["start_s"] == 20.0
    assert rows["baseline"]["latency_s"]["p50"] == pytest.approx(0.49)


def test_chaos_recovery_of_each_fault_from_records_events_and_heartbeats() -> None:
    from bench.chaos import tally

    submissions, records, events = chaos_inputs()
    faults = chaos_faults()
    out = tally.tally_jobs(submissions, records, events, tally.windows_of(T0, faults), exclude=["poison"])
    first_seen = {"w1@h|11": T0, "w1@h|12": T0 + 12, "w3@h|30": T0 + 18}
    letters = [{"job_id": "poison", "reason": "poison"},
               {"job_id": None, "reason": "unreadable", "raw": "junk-1 {not json", "dead_at": T0 + 18.25,
                "error": {"type": "InvalidInputError"}}]
    rec = {f["kind"]: tally.recovery(f, jobs=out["jobs"], records=records, submissions=submissions,
                                     first_seen=first_seen, dead_letters=letters) for f in faults}
    pool = rec["pool-kill"]
    assert (pool["held"], pool["held_succeeded"], pool["recovery_s"], pool["replaced_s"]) == (2, 2, 3.5, 2.0)
    assert pool["next_success_s"] == 2.5
    worker = rec["worker-kill"]
    assert worker["held_failed"] == {"ModelNotFoundError": 1} and worker["replaced_s"] == 3.0
    poison = rec["poison"]
    assert poison["as_expected"] and poison["deliveries"] == 4 and poison["kills"] == 3 and poison["recovery_s"] == 3
    malformed = rec["malformed"]
    assert malformed["as_expected"] and malformed["recovery_s"] == 0.25
    redis = rec["redis-restart"]
    assert redis["outage_s"] == 3.0 and redis["first_202_s"] == pytest.approx(1.01)
    assert redis["next_success_after_back_s"] == 1.5 and redis["refused_during"] == 2


def test_chaos_counter_check_replacements_and_verdict() -> None:
    from bench.chaos import tally

    assert tally.stats_check(10, 9)["extra_executions"] == 1
    assert tally.stats_check(None, 9)["extra_executions"] is None
    seen = {"a@h|1": 0.0, "a@h|2": 1.0, "a@h|3": 2.0, "b@h|4": 0.0}
    # node a started with one process and lost one to a kill: its third id is a process that died on its own
    assert tally.unexplained_replacements(seen, per_node=1, kills_by_node={"a@h": 1}) == {"a@h": 1}
    assert tally.unexplained_replacements(seen, per_node=1, kills_by_node={"a@h": 2}) == {}
    clean = {"lost": 0, "run_twice": 0, "failed": 0, "cancelled": 0, "failed_by_type": {}}
    fine = [{"kind": "poison", "label": "poison", "recovery": {"as_expected": True, "recovery_s": 1.0}}]
    assert tally.verdict(clean, fine, {"extra_executions": 0}) == {"ok": True, "problems": []}
    bad = tally.verdict({**clean, "lost": 1}, [{**fine[0], "recovery": {"as_expected": False}}],
                        {"extra_executions": 2})
    assert not bad["ok"] and len(bad["problems"]) == 4


def test_chaos_report_writes_markdown_and_strict_json(tmp_path: Path) -> None:
    from bench.chaos import report, tally

    submissions, records, events = chaos_inputs()
    faults = chaos_faults()
    out = tally.tally_jobs(submissions, records, events, tally.windows_of(T0, faults), exclude=["poison"])
    for f in faults:
        f["recovery"] = tally.recovery(f, jobs=out["jobs"], records=records, submissions=submissions,
                                       first_seen={}, dead_letters=[])
        f["at_s"] = f["at"] - T0
    stats = tally.stats_check(6, 5)
    run = {"meta": {"host": "chaos host", "started_at": "2026-01-02 03:04:05 +0000", "mode": "quick",
                    "engine": "batching", "mode_notes": ["quick mode"], "loadavg_start": (0.1, 0.2, 0.3)},
           "plan": {"jobs": 8, "rate_per_s": 1.0, "in_flight": 4, "workers": 2, "concurrency": 2,
                    "env": {"WORKER_LOST_AFTER_SECONDS": 5}, "poison": {"items": 100, "n_steps": 1024}},
           "faults": faults, "windows": out["windows"], "total": out["total"], "lost": out["lost"],
           "run_twice": out["run_twice"], "failed": out["failed"], "succeeded_events_anomalies": [],
           "checks": {"stats": stats, "events_missed": 0, "event_gaps": [{"lost_s": 20.0, "back_s": None}],
                      "event_messages": 9, "unknown_records": {}, "unexplained_replacements": {},
                      "queues_left": {}, "unacked_left": 0, "dead_letters": 0},
           "verdict": tally.verdict(out["total"], faults, stats), "failures": []}
    paths = report.write(run, tmp_path)
    assert paths["md"].name.endswith("-chaos-host-chaos-quick.md") and paths["json"].suffix == ".json"
    md = paths["md"].read_text()
    assert "## Per fault window" in md and "## Faults and recovery" in md and "**Verdict: problems found:**" in md
    assert "`w1@h\\|11`" in md  # a worker id's pipe does not split its table cell
    assert "## Jobs run twice (1)" in md and "| `j4` |" in md
    assert "| pool kill (+2.010 s) |" in md  # j3, lost: the fault nearest its 202
    data = json.loads(paths["json"].read_text())
    assert data["total"]["run_twice"] == 1 and data["checks"]["stats"]["extra_executions"] == 1
    assert any("extra execution" in line for line in report.summary(run))
