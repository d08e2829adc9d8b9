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
    assert len(data["records"]) == len(records()) and len(data["targets"]) == 16  # 10 + 6 (default config)


def test_quick_plan_is_a_subset_of_the_full_plan() -> None:
    for system in ("b", "b2", "c", "d", "e", "f"):
        quick = {p.label for p in plan(system, QUICK, "celery")}
        full = {p.label for p in plan(system, FULL, "celery")}
        assert quick and quick <= full, system
    batch = [p for p in plan("c", FULL, "celery") if p.kind == "batch"]
    assert batch and batch[0].items == BATCH_JOB_SIZE
