"""The many-models benchmark's report: targets, systems side by side, the simulation; Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SYSTEMS = {"a": "fleet, plain pool routing", "b": "fleet, cache-aware routing (default)",
           "c": "Ray Serve, model multiplexing", "d": "ideal: one LRU of the fleet's total size"}


def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def targets(result: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met is None where a system it needs did not run."""
    s = result["systems"]
    a, b, c = (s.get(k, {}).get("saturated") for k in "abc")
    bo, co = s.get("b", {}).get("open"), s.get("c", {}).get("open")
    rows: list[tuple[str, str, bool | None]] = []
    if b:
        gap = 100 * (b["ideal_hit_ratio"] - b["hit_ratio"])
        rows.append(("(b) hit ratio within 5 points of the ideal (d)",
                     f"{b['hit_ratio']:.3f} vs {b['ideal_hit_ratio']:.3f} ({gap:+.1f} points below)", gap <= 5))
    if a and b:
        r = _ratio(b["loads_per_1000"], a["loads_per_1000"])
        rows.append(("(b) loads per 1,000 requests <= half of (a)'s",
                     f"{b['loads_per_1000']:.0f} vs {a['loads_per_1000']:.0f} ({_f(r, 2)}x)",
                     r is not None and r <= 0.5))
        r = _ratio(b["throughput"], a["throughput"])
        rows.append(("(b) throughput >= 1.5x (a)", f"{b['throughput']:.1f}/s vs {a['throughput']:.1f}/s "
                     f"({_f(r, 2)}x)", r is not None and r >= 1.5))
    if b and c:
        r = _ratio(b["throughput"], c["throughput"])
        rows.append(("(b) throughput >= (c)", f"{b['throughput']:.1f}/s vs {c['throughput']:.1f}/s ({_f(r, 2)}x)",
                     r is not None and r >= 1.0))
        rows.append(("(b) p99 <= (c)'s, saturated", f"{b['p99_ms']:.0f} ms vs {c['p99_ms']:.0f} ms",
                     b["p99_ms"] <= c["p99_ms"]))
    if bo and co:
        rows.append((f"(b) p99 <= (c)'s, open loop at {result['mode']['open_rate']:g}/s",
                     f"{bo['p99_ms']:.0f} ms vs {co['p99_ms']:.0f} ms", bo["p99_ms"] <= co["p99_ms"]))
    sim = next((r for r in result.get("simulation", {}).get("rows", []) if r["processes"] == 128), None)
    if sim:
        gap = 100 * (sim["ideal"]["hit_ratio"] - sim["cache_aware"]["hit_ratio"])
        rows.append(("simulation, 128 processes: (b) hit ratio within 5 points of the ideal",
                     f"{sim['cache_aware']['hit_ratio']:.3f} vs {sim['ideal']['hit_ratio']:.3f} "
                     f"({gap:+.1f} points below)", gap <= 5))
    new = result["cold_loads"]["models"][0]["new"]
    rows.append(("cold load of the small model p50 <= 10 ms", f"{new['p50_ms']:.2f} ms (p99 {new['p99_ms']:.2f})",
                 new["p50_ms"] <= 10))
    return rows


#: The parts of a fleet request's CPU, as :func:`bench.manymodels.run._measure` records them.
CPU_PARTS = ("api", "workers", "redis", "load generator")


def cpu_split(result: dict) -> dict[str, float] | None:
    """What a cold load costs and what routing can win on this machine, from (a)'s and (b)'s saturated CPU.

    A cold load's cost is the workers' CPU per request that (b) saves over (a), per load it saves; a request's
    cost without any load is (b)'s CPU per request less its loads. Throughput on a CPU-bound machine goes as
    1 / CPU per request, so (a)'s CPU per request over that is the most any routing (every request a hit) could
    gain over (a). None without both systems or with too few loads saved to tell.
    """
    s = result["systems"]
    a, b = (s.get(k, {}).get("saturated") or {} for k in "ab")
    ca, cb = a.get("cpu_ms_per_request") or {}, b.get("cpu_ms_per_request") or {}
    if not all(part in ca and part in cb for part in CPU_PARTS):
        return None
    saved = (a["loads_per_1000"] - b["loads_per_1000"]) / 1000.0
    if saved < 0.05:
        return None
    total_a, total_b = sum(ca[p] for p in CPU_PARTS), sum(cb[p] for p in CPU_PARTS)
    load_ms = (ca["workers"] - cb["workers"]) / saved
    no_load_ms = total_b - b["loads_per_1000"] / 1000.0 * load_ms
    return {"load_cpu_ms": load_ms, "request_cpu_ms_a": total_a, "request_cpu_ms_b": total_b,
            "request_cpu_ms_no_load": no_load_ms, "ceiling": total_a / no_load_ms if no_load_ms > 0 else None,
            "cores_busy_b": cb.get("machine", 0.0) * b["throughput"] / 1000.0}


def markdown(result: dict, day: str) -> str:
    mode, m = result["mode"], result["machine"]
    lines = [f"# Many models, {day}", "",
             f"{mode['n_models']} small PatchTSTs (96 x 5 -> 24, random-init, written in "
             f"{result['store']['seconds']:.1f} s), a Zipf (s = {mode['zipf_s']}) trace over them; "
             f"{mode['processes']} processes (replicas) with {mode['cache_per_process']} models each "
             f"({mode['processes'] * mode['cache_per_process']} in all). Per system: {mode['warmup_s']:g} s warm-up, "
             f"{mode['open_s']:g} s open loop at {mode['open_rate']:g} requests/s, {mode['saturated_s']:g} s closed "
             f"loop at {mode['concurrency']} in flight. Hit ratio = 1 - cold loads / requests (the systems' own "
             "counters). Command: `python -m bench models`.", ""]
    lines += [f"- {n}" for n in mode.get("notes") or ()]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(result):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no' if met is not None else 'n/a'} |")
    lines += ["", "## Systems", "",
              "| system | phase | requests/s | p50 ms | p99 ms | hit ratio | ideal (d) | loads / 1,000 | "
              "mean cold load ms | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, res in result["systems"].items():
        for phase in ("open", "saturated"):
            p = res[phase]
            lines.append(f"| ({key}) {SYSTEMS[key]} | {phase} | {p['throughput']:.1f} | {_f(p['p50_ms'], 0)} | "
                         f"{_f(p['p99_ms'], 0)} | {_f(p['hit_ratio'], 3)} | {_f(p['ideal_hit_ratio'], 3)} | "
                         f"{_f(p['loads_per_1000'], 0)} | {_f(p['load_ms_mean'], 2)} | {p['errors']} |")
    for key, res in result["systems"].items():
        if "copies" in res:
            c = res["copies"]
            lines.append(f"\n({key}) at the end: {c['models_held']} distinct models held, "
                         f"{c['models_with_copies']} with more than one copy, at most {c['most_copies']} copies.")
        if "cold_load_ms" in res:
            c = res["cold_load_ms"]
            lines.append(f"\n({key}) cold loads inside the replicas: p50 {_f(c['p50'], 2)} ms, p99 {_f(c['p99'], 2)} "
                         f"ms over {c['n']} loads.")
    cpu_rows = [(key, res["saturated"]["cpu_ms_per_request"]) for key, res in result["systems"].items()
                if res["saturated"].get("cpu_ms_per_request")]
    if cpu_rows:
        lines += ["", "## Where a request's CPU goes (saturated)", "",
                  "CPU milliseconds per completed request, by process (user + system); machine: every core's busy "
                  "time.", "", "| system | API | workers | Redis | load generator | machine |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, cpu in cpu_rows:
            lines.append(f"| ({key}) | " + " | ".join(_f(cpu.get(part), 2) for part in (*CPU_PARTS, "machine")) + " |")
        split = cpu_split(result)
        if split:
            lines += ["", f"A cold load costs the workers about {split['load_cpu_ms']:.1f} ms of CPU ((a)'s worker CPU "
                      f"per request over (b)'s, per load saved); a request without one costs "
                      f"{split['request_cpu_ms_no_load']:.1f} ms in all (API, workers, Redis, load generator), "
                      f"against {split['request_cpu_ms_a']:.1f} ms in (a). With the machine CPU-bound "
                      f"({split['cores_busy_b']:.1f} cores busy in (b)), routing that made every request a hit would "
                      f"reach at most {_f(split['ceiling'], 2)}x (a)'s throughput here: the request path, not the "
                      "cold loads, is most of the cost."]
    new = result["cold_loads"]["models"][0]["new"]
    lines += ["", f"The fleet's cold load of one of these models (simple adapter, `bench coldload`'s new path, 50 "
              f"loads): p50 {new['p50_ms']:.2f} ms, p99 {new['p99_ms']:.2f} ms."]
    for failure in result["failures"]:
        lines.append(f"\n**({failure['system']}) failed**: {failure['error']}")
    sim = result.get("simulation")
    if sim:
        lines += ["", "## Simulation", "",
                  f"The same routing code (the router's script on a real Redis, the members' publishing, the "
                  f"placement cost, the per-process cache) driving simulated processes of "
                  f"{sim['rows'][0]['cache_per_process']} models each; a hit costs {sim['hit_ms']:.2f} ms, a cold "
                  f"load {sim['load_ms']:.2f} ms more "
                  f"(measured above); arrivals at 70 % of the plain fleet's capacity.", "",
                  "| processes | total cache | plain hit ratio | cache-aware hit ratio | ideal | plain loads / 1,000 | "
                  "cache-aware loads / 1,000 | plain p99 ms | cache-aware p99 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sim["rows"]:
            p, c = r["plain"], r["cache_aware"]
            lines.append(f"| {r['processes']} | {r['processes'] * r['cache_per_process']} | {p['hit_ratio']:.3f} | "
                         f"{c['hit_ratio']:.3f} | {r['ideal']['hit_ratio']:.3f} | {p['loads_per_1000']:.0f} | "
                         f"{c['loads_per_1000']:.0f} | {p['p99_ms']:.1f} | {c['p99_ms']:.1f} |")
    lines += ["", f"Machine: {m['cpu']} x {m['cpu_count']}, torch {m['torch']}, Python {m['python']}, commit "
              f"{m['commit']}{' (uncommitted changes)' if m['dirty'] else ''}, load average at start "
              f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}."]
    if result.get("leftover_processes"):
        lines.append(f"\nLeft running after the run: {result['leftover_processes']}")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, day: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{day}-models.md", out_dir / f"{day}-models.json"
    md.write_text(markdown(result, day))
    js.write_text(json.dumps(result, indent=1, default=str))
    return {"md": md, "json": js}
