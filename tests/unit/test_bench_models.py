"""The many-models benchmark's parts: the Zipf trace, the ideal LRU, the simulation (the real router on fakeredis)
and the targets table."""

from __future__ import annotations

import fakeredis
import numpy as np

from bench.manymodels import report, workload
from bench.manymodels.simulate import simulate


def test_the_trace_is_zipf_and_seeded():
    trace = workload.zipf_trace(1000, 20_000, 1.1, seed=3)
    assert np.array_equal(trace, workload.zipf_trace(1000, 20_000, 1.1, seed=3))
    counts = np.sort(np.bincount(trace, minlength=1000))[::-1]
    # rank 1 over rank 10 is 10^1.1 (about 12.6) for Zipf(1.1); sampled, within a loose band
    assert 8 < counts[0] / counts[9] < 20
    assert 0.3 < workload.ideal_lru(trace, 32)["hit_ratio"] < 0.7


def test_the_ideal_lru_counts_hits_and_loads():
    assert workload.ideal_lru([1, 2, 1, 3, 1, 2], 2) == {"hit_ratio": 2 / 6, "loads_per_1000": 1000 * 4 / 6}


def test_the_simulated_cache_aware_fleet_nears_the_ideal_and_the_plain_one_does_not():
    trace = workload.zipf_trace(300, 6000, 1.1, seed=0)
    kwargs = dict(processes=8, cache_per_process=4, hit_ms=1.0, load_ms=3.0, rate=2000.0, warmup=1000)
    plain = simulate(trace, cache_aware=False, **kwargs)
    aware = simulate(trace, cache_aware=True, redis=fakeredis.FakeRedis(), **kwargs)
    ideal = workload.ideal_lru(trace[1000:], 32)["hit_ratio"]
    assert aware["requests"] == plain["requests"] == 5000
    assert plain["hit_ratio"] < ideal - 0.15
    assert abs(aware["hit_ratio"] - ideal) < 0.05, (aware, ideal)


def test_the_targets_table_reads_the_phases():
    def phase(throughput, hit, ideal, loads, p99):
        return {"throughput": throughput, "hit_ratio": hit, "ideal_hit_ratio": ideal, "loads_per_1000": loads,
                "p99_ms": p99, "p50_ms": 1.0, "errors": 0, "load_ms_mean": 2.0}

    result = {"mode": {"open_rate": 30.0}, "systems": {
        "a": {"saturated": phase(100, 0.4, 0.6, 600, 50)},
        "b": {"saturated": phase(160, 0.58, 0.6, 280, 40), "open": phase(30, 0.6, 0.6, 300, 20)},
        "c": {"saturated": phase(90, 0.5, 0.6, 500, 80), "open": phase(30, 0.5, 0.6, 500, 30)}},
        "cold_loads": {"models": [{"new": {"p50_ms": 2.5, "p99_ms": 3.0}}]}, "simulation": {"rows": []}}
    rows = {target: met for target, _, met in report.targets(result)}
    assert all(rows.values()), rows
    result["systems"]["b"]["saturated"]["throughput"] = 120
    rows = {target: met for target, _, met in report.targets(result)}
    assert rows["(b) throughput >= 1.5x (a)"] is False


def test_the_cpu_split_prices_a_cold_load_and_bounds_what_routing_can_win():
    def saturated(loads, workers):
        return {"saturated": {"throughput": 100.0, "loads_per_1000": loads, "cpu_ms_per_request": {
            "api": 3.0, "workers": workers, "redis": 1.0, "load generator": 1.0, "machine": 20.0}}}

    # (b) saves 0.3 loads per request and 1.5 ms of worker CPU: 5 ms a load; without loads a request costs
    # 3 + (4.5 - 0.3 * 5) + 1 + 1 = 8 ms, against 11 ms in (a): at most 1.375x
    result = {"systems": {"a": saturated(600, 6.0), "b": saturated(300, 4.5)}}
    split = report.cpu_split(result)
    assert abs(split["load_cpu_ms"] - 5.0) < 1e-9 and abs(split["request_cpu_ms_no_load"] - 8.0) < 1e-9
    assert abs(split["ceiling"] - 11.0 / 8.0) < 1e-9 and abs(split["cores_busy_b"] - 2.0) < 1e-9
    assert report.cpu_split({"systems": {"a": saturated(600, 6.0), "b": saturated(590, 5.9)}}) is None
    assert report.cpu_split({"systems": {"b": saturated(300, 4.5)}}) is None
