"""Turn a run's records into the targets, a Markdown report, a JSON dump and a throughput-vs-p99 plot."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from bench.config import BATCH_JOB_SIZE, SATURATION_CONCURRENCY as SAT
from bench.stats import ratio

#: The fleet mode of bench.config.FLEET_MODES that is the default configuration.
DEFAULT_ENGINE = "batching"

Record = dict[str, Any]
SYSTEM_ORDER = ("a", "b", "b2", "c", "d", "g", "e", "h", "f")
SYSTEM_LABELS = {"a": "(a) in-process", "b": "(b) plain Celery", "b2": "(b2) celery-batches",
                 "c": "(c) fleet / Celery", "d": "(d) fleet / HTTP", "g": "(g) fleet / OIP gRPC",
                 "e": "(e) Triton", "h": "(h) Triton / gRPC", "f": "(f) TorchServe"}


# -- selecting records -----------------------------------------------------------------------------------------
def select(records: Iterable[Record], **where: Any) -> list[Record]:
    """Records whose fields equal ``where`` (a callable value is a predicate on the field)."""
    out = []
    for r in records:
        if all((v(r.get(k)) if callable(v) else r.get(k) == v) for k, v in where.items()):
            out.append(r)
    return out


def best(records: Iterable[Record], **where: Any) -> Record | None:
    """The matching record of highest throughput (None when nothing matches)."""
    found = [r for r in select(records, **where) if _num(r.get("throughput"))]
    return max(found, key=lambda r: r["throughput"]) if found else None


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def describe(record: Record | None) -> str:
    if record is None:
        return "not measured"
    load = (f"batch {record['concurrency']}" if record["pattern"] == "inprocess" else
            f"c={record['concurrency']}" if record["pattern"] == "closed" else f"open {record['rate']:.0f}/s")
    parts = [record.get("variant") or "", record["encoding"] if record["pattern"] != "inprocess" else "",
             "batch jobs of 64" if record["kind"] == "batch" else "", load]
    return ", ".join(p for p in parts if p)


# -- targets ---------------------------------------------------------------------------------------------------
def _target(tid: str, text: str, measured: Record | None, value: Callable[[Record], float],
            target: float, unit: str, higher_better: bool = True, basis: str = "") -> dict[str, Any]:
    got = value(measured) if measured is not None else math.nan
    row = {"id": tid, "text": text, "measured": got, "target": target, "unit": unit,
           "higher_better": higher_better, "measured_from": describe(measured), "basis": basis}
    if not (_num(got) and _num(target)):
        row.update(status="N/A", margin="not measured")
        return row
    passed = got >= target if higher_better else got < target if unit == "ms (p99)" else got <= target
    row["status"] = "PASS" if passed else "MISS"
    if higher_better:
        pct = (got / target - 1) * 100 if target else math.nan
        row["margin"] = (f"+{pct:.0f} % over" if passed
                         else f"missed by {-pct:.0f} % ({target - got:.1f} {unit} short)")
    else:
        row["margin"] = (f"{target - got:.1f} ms under" if passed else f"missed by {got - target:.1f} ms")
    return row


def compute_targets(records: list[Record]) -> list[dict[str, Any]]:
    closed_predict = dict(pattern="closed", kind="predict")
    a = best(records, system="a", model="ref")
    a_c1 = next(iter(select(records, system="a", variant="1x1", model="ref")), None)
    b = best(records, system="b", model="ref", **closed_predict)
    b2 = best(records, system="b2", model="ref", **closed_predict)
    c = best(records, system="c", model="ref", **closed_predict)
    c_batch = best(records, system="c", kind="batch")
    c1s = [r for r in select(records, system="c", model="ref", concurrency=1, **closed_predict) if _num(r["p50_ms"])]
    c_c1 = min(c1s, key=lambda r: r["p50_ms"]) if c1s else None
    c_small = best(records, system="c", model="small", **closed_predict)
    b_small = best(records, system="b", model="small", **closed_predict)
    d = best(records, system="d", model="ref", concurrency=SAT, **closed_predict)
    e = best(records, system="e", model="ref", concurrency=SAT, **closed_predict)
    f = best(records, system="f", model="ref", concurrency=SAT, **closed_predict)
    g = best(records, system="g", model="ref", concurrency=SAT, **closed_predict)
    h = best(records, system="h", model="ref", concurrency=SAT, **closed_predict)
    default = dict(variant=DEFAULT_ENGINE, **closed_predict)
    c_def = best(records, system="c", model="ref", concurrency=SAT, **default)
    d_def = best(records, system="d", model="ref", concurrency=SAT, **default)
    c_def_small = best(records, system="c", model="small", **default)
    d_def_small = best(records, system="d", model="small", **default)
    b2_small = best(records, system="b2", model="small", **closed_predict)
    tp = (lambda r: r["throughput"])
    tput = (lambda r: r["throughput"] if r else math.nan)
    p50 = (lambda r: r["p50_ms"])
    p99 = (lambda r: r["p99_ms"])
    return [
        _target("c-vs-a", "(c) reference model, saturated: >= 70 % of (a)'s limit", c, tp, 0.7 * tput(a), "pred/s",
                basis=f"(a) limit {tput(a):.1f}/s ({describe(a)})"),
        _target("c-vs-b", "(c) reference model, saturated: >= 1.9x (b)", c, tp, 1.9 * tput(b), "pred/s",
                basis=f"(b) {tput(b):.1f}/s ({describe(b)})"),
        _target("c-vs-b2", "(c) reference model, saturated: >= 1.25x best celery-batches", c, tp, 1.25 * tput(b2),
                "pred/s", basis=f"(b2) {tput(b2):.1f}/s ({describe(b2)})"),
        _target("c-batch-vs-a", f"(c) explicit batch jobs of {BATCH_JOB_SIZE}: >= 90 % of (a)", c_batch, tp,
                0.9 * tput(a), "pred/s", basis=f"(a) limit {tput(a):.1f}/s"),
        _target("c-c1-p50", "(c) one request in flight: p50 <= (a) one-thread batch-1 p50 + 3 ms", c_c1, p50,
                (a_c1["p50_ms"] + 3) if a_c1 else math.nan, "ms", higher_better=False,
                basis=f"(a) 1 thread batch 1 p50 {a_c1['p50_ms']:.2f} ms" if a_c1 else ""),
        _target("c-small-vs-b", "(c) small model, saturated: >= 3x (b) on the same model", c_small, tp,
                3 * tput(b_small), "pred/s", basis=f"(b) small {tput(b_small):.1f}/s ({describe(b_small)})"),
        _target("d-vs-f", f"(d) saturated (c={SAT}): >= 1.2x (f) at the same concurrency", d, tp, 1.2 * tput(f),
                "pred/s", basis=f"(f) {tput(f):.1f}/s"),
        _target("d-vs-e", f"(d) saturated (c={SAT}): >= (e) at the same concurrency", d, tp, tput(e), "pred/s",
                basis=f"(e) {tput(e):.1f}/s ({describe(e)})"),
        _target("d-p99-vs-e", f"(d) saturated (c={SAT}): p99 lower than (e)", d, p99,
                e["p99_ms"] if e else math.nan, "ms (p99)", higher_better=False),
        _target("d-p99-vs-f", f"(d) saturated (c={SAT}): p99 lower than (f)", d, p99,
                f["p99_ms"] if f else math.nan, "ms (p99)", higher_better=False),
        # The same protocol, the same client library: the fleet's Open Inference Protocol gRPC beside Triton's.
        _target("g-vs-h", f"(g) OIP gRPC, saturated (c={SAT}): >= (h) Triton gRPC", g, tp, tput(h), "pred/s",
                basis=f"(h) {tput(h):.1f}/s ({describe(h)})"),
        _target("g-p99-vs-h", f"(g) OIP gRPC, saturated (c={SAT}): p99 lower than (h)", g, p99,
                h["p99_ms"] if h else math.nan, "ms (p99)", higher_better=False),
        # The default configuration (what `fleet up` runs), against the baselines and the committed figures of
        # the direct engine it replaced (0.63x / 2.0x through Celery, 0.71x / 2.2x through HTTP, 2026-11-25).
        _target("default-small-vs-b2", "default config, small model, saturated, Celery producer: >= best (b2)",
                c_def_small, tp, tput(b2_small), "pred/s", basis=f"(b2) small {tput(b2_small):.1f}/s"),
        _target("default-small-d-vs-b", "default config, small model, saturated, HTTP: >= 3x (b)", d_def_small, tp,
                3 * tput(b_small), "pred/s", basis=f"(b) small {tput(b_small):.1f}/s"),
        _target("default-c-vs-a", f"default config, reference, c={SAT}, Celery producer: >= 0.63x (a)", c_def, tp,
                0.63 * tput(a), "pred/s", basis=f"(a) limit {tput(a):.1f}/s"),
        _target("default-c-vs-b", f"default config, reference, c={SAT}, Celery producer: >= 2.0x (b)", c_def, tp,
                2.0 * tput(b), "pred/s", basis=f"(b) {tput(b):.1f}/s"),
        _target("default-d-vs-a", f"default config, reference, c={SAT}, HTTP: >= 0.71x (a)", d_def, tp,
                0.71 * tput(a), "pred/s", basis=f"(a) limit {tput(a):.1f}/s"),
        _target("default-d-vs-b", f"default config, reference, c={SAT}, HTTP: >= 2.2x (b)", d_def, tp,
                2.2 * tput(b), "pred/s", basis=f"(b) {tput(b):.1f}/s"),
    ]


# -- formatting ------------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 1) -> str:
    if not _num(value):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio_cell(value: float) -> str:
    return f"{value:.2f}x" if _num(value) else "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sort_key(r: Record) -> tuple:
    return (SYSTEM_ORDER.index(r["system"]) if r["system"] in SYSTEM_ORDER else 99, r.get("variant", ""),
            r["kind"], r["encoding"], r["pattern"], r["concurrency"], r.get("rate", 0))


def render_markdown(run: dict[str, Any], targets: list[dict[str, Any]], plot_name: str) -> str:
    meta, records = run["meta"], run["records"]
    lines = [f"# FinSight Fleet benchmark — {meta['started_at'][:10]} on {meta['host']}", ""]
    lines += [f"- Mode: **{meta['mode']}**, run took {meta.get('duration_s', 0):.0f} s; commit `{meta.get('commit')}`"
              f"{' (with uncommitted changes)' if meta.get('dirty') else ''}",
              f"- Machine: {meta.get('cpu')}, {meta.get('cpu_count')} cores; Python {meta.get('python')}, torch "
              f"{meta.get('torch')}; load average at start {_load(meta.get('loadavg_start'))}, at end "
              f"{_load(meta.get('loadavg_end'))}",
              f"- Cores: servers on {meta['cores']['server']}, load generator on {meta['cores']['client']}"
              + (" — on this machine the load generator shares the two server cores, so every system's "
                 "numbers include the client's CPU competition (client CPU is reported separately)"
                 if meta["cores"]["client"] == "shared" else ""),
              "- Weights are random-init with fixed seeds: this measures serving, not accuracy.",
              f"- Every system serves the same two models on the same cores; throughput is predictions/s, latency "
              f"is per request (ms), CPU is server-side CPU seconds per 1,000 predictions (psutil, over the "
              f"measurement window; Redis counts for the Celery-based systems); client CPU is the load generator's; "
              f"'other load' is the cores used by anything else on the machine during the window (noise). "
              f"Saturated = c={SAT}."]
    lines += [f"- {note}" for note in meta.get("mode_notes", [])]
    busy = busy_fraction(records)
    noisy = [r for r in records if _num(r.get("other_load")) and r["other_load"] > BUSY_LOAD]
    if busy is not None and busy > BUSY_LOAD:
        lines.append(f"- **WARNING: the machine was busy with other work** during the windows (median 'other load' "
                     f"{busy:.2f} cores, from processes that are neither the servers nor the load generator): these "
                     f"numbers are not a fair measurement; rerun on a quiet machine.")
    elif noisy:
        lines.append(f"- **Note:** {len(noisy)} of {len(records)} points ran while other processes on the machine used "
                     f"more than {BUSY_LOAD} cores (marked `!` in the 'other load' column): treat them with care.")
    if meta.get("orphans"):
        lines.append(f"- WARNING: processes left behind after the run: {meta['orphans']}")
    lines += ["", "## Models", ""]
    lines += _table(["name", "model id", "config", "parameters"],
                    [[name, m["model_id"], ", ".join(f"{k}={v}" for k, v in m["config"].items()),
                      f"{m['n_params']:,}"] for name, m in meta.get("models", {}).items()])

    lines += ["", "## Targets", ""]
    lines += _table(["target", "measured", "target value", "status", "margin", "measured from", "basis"],
                    [[t["text"], f"{_f(t['measured'], 2)} {t['unit']}", f"{_f(t['target'], 2)} {t['unit']}",
                      f"**{t['status']}**", t["margin"], t["measured_from"], t["basis"]] for t in targets])
    missed = [t for t in targets if t["status"] == "MISS"]
    if missed:
        from bench.limits import LIMITS

        lines += ["", "### What limits it", ""]
        for t in missed:
            lines += [f"- **{t['text']}** — {t['margin']}. {LIMITS.get(t.get('id', ''), 'Not profiled.')}"]

    lines += ["", f"## Summary: reference model, best closed-loop point of each system (c={SAT} where measured)", ""]
    a_ref = best(records, system="a", model="ref")
    b_ref = best(records, system="b", model="ref", pattern="closed", kind="predict")
    rows = []
    for key in SYSTEM_ORDER:
        if key == "a":
            rec = a_ref
        else:
            rec = best(records, system=key, model="ref", pattern="closed", kind="predict", concurrency=SAT) or \
                best(records, system=key, model="ref", pattern="closed", kind="predict")
        if rec is None:
            continue
        rows.append([SYSTEM_LABELS[key], describe(rec), _f(rec["throughput"]), _f(rec["p50_ms"]), _f(rec["p95_ms"]),
                     _f(rec["p99_ms"]), _f(rec["cpu_per_1k_s"], 2),
                     _ratio_cell(ratio(rec["throughput"], a_ref and a_ref["throughput"])),
                     _ratio_cell(ratio(rec["throughput"], b_ref and b_ref["throughput"]))])
    lines += _table(["system", "configuration", "pred/s", "p50 ms", "p95 ms", "p99 ms", "CPU s/1k", "x (a)", "x (b)"],
                    rows)

    for model in ("ref", "small"):
        lines += ["", f"## All measurements: {'reference' if model == 'ref' else 'small'} model", ""]
        a_m = best(records, system="a", model=model)
        b_m = best(records, system="b", model=model, pattern="closed", kind="predict")
        rows = []
        for r in sorted(select(records, model=model), key=_sort_key):
            rows.append([SYSTEM_LABELS.get(r["system"], r["system"]) + (" *" if r.get("chosen") else ""),
                         r.get("variant", ""), r["encoding"] if r["pattern"] != "inprocess" else "numpy",
                         "batch jobs of 64" if r["kind"] == "batch" else r["kind"],
                         (f"batch {r['concurrency']}" if r["pattern"] == "inprocess" else
                          f"c={r['concurrency']}" if r["pattern"] == "closed" else f"open {r['rate']:.0f}/s"),
                         _f(r["throughput"]), _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]),
                         _f(r["cpu_per_1k_s"], 2), _f(r.get("client_cpu_per_1k_s"), 2),
                         _noise_cell(r.get("other_load")), _f(r["errors"], 0), str(len(r.get("reps", []))),
                         _ratio_cell(ratio(r["throughput"], a_m and a_m["throughput"])),
                         _ratio_cell(ratio(r["throughput"], b_m and b_m["throughput"]))])
        lines += _table(["system", "variant", "encoding", "kind", "load", "pred/s", "p50 ms", "p95 ms", "p99 ms",
                         "server CPU s/1k", "client CPU s/1k", "other load", "errors", "reps", "x (a)", "x (b)"], rows)
    if any(r.get("chosen") for r in records):
        lines += ["", "\\* the layout kept for the other points (best at saturation)."]

    lines += ["", "## What each wire encoding costs (reference input, 512 x 7 float32, one predict body)", ""]
    enc = meta.get("encodings", [])
    base = next((e for e in enc if e["form"] == "json-list"), None)
    lines += _table(["form", "payload bytes", "vs JSON lists", "producer encode us", "decode us"],
                    [[e["form"], f"{e['bytes']:,}", _ratio_cell(ratio(e["bytes"], base and base["bytes"])),
                      _f(e["encode_us"]), _f(e["decode_us"])] for e in enc])

    lines += ["", "## Systems", ""]
    for info in sorted(run.get("systems", []), key=lambda i: SYSTEM_ORDER.index(i["system"])
                       if i["system"] in SYSTEM_ORDER else 99):
        notes = "; ".join(info.get("notes", []))
        lines.append(f"- **{SYSTEM_LABELS.get(info['system'], info['system'])}** — {info['name']}"
                     f"{' [' + info['variant'] + ']' if info.get('variant') else ''}{': ' + notes if notes else ''}")
    if run.get("failures"):
        lines += ["", "## Failures", ""]
        lines += [f"- {f['system']} / {f['step']}: `{f['error']}`" for f in run["failures"]]
    lines += ["", "## Plot", "", f"![throughput vs p99 latency]({plot_name})", ""]
    return "\n".join(lines)


#: Cores of foreign CPU use (median over windows) above which the report warns that the machine was busy.
BUSY_LOAD = 0.2


def _noise_cell(value: Any) -> str:
    return _f(value, 2) + (" !" if _num(value) and value > BUSY_LOAD else "")


def busy_fraction(records: list[Record]) -> float | None:
    """Median 'other load' (cores busy with foreign processes) over the measured windows."""
    import statistics

    values = [r["other_load"] for r in records if _num(r.get("other_load"))]
    return statistics.median(values) if values else None


def _load(value: Any) -> str:
    return ", ".join(f"{v:.2f}" for v in value) if value else "–"


#: One colour and marker per system; line styles tell a system's variants and encodings apart.
SYSTEM_STYLE = {"a": ("#555555", "*"), "b": ("#d62728", "o"), "b2": ("#ff7f0e", "s"), "c": ("#1f77b4", "^"),
                "d": ("#2ca02c", "v"), "e": ("#9467bd", "D"), "f": ("#8c564b", "P"), "g": ("#17becf", "X"),
                "h": ("#e377c2", "d")}
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def plot(records: list[Record], path: Path) -> None:
    """Throughput (x) against p99 latency (y), both log, one colour/marker per system; both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 8))
    for ax, model in zip(axes, ("ref", "small")):
        groups: dict[tuple, list[Record]] = {}
        for r in select(records, model=model):
            if r["pattern"] == "open" or not _num(r["p99_ms"]) or not _num(r["throughput"]):
                continue
            groups.setdefault((r["system"], r.get("variant", ""), r["encoding"], r["kind"]), []).append(r)
        styles_used: dict[str, int] = {}
        for (system, variant, encoding, kind), rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0])):
            rs.sort(key=lambda r: r["concurrency"])
            colour, marker = SYSTEM_STYLE.get(system, ("black", "x"))
            style = LINE_STYLES[styles_used.get(system, 0) % len(LINE_STYLES)]
            styles_used[system] = styles_used.get(system, 0) + 1
            label = f"{SYSTEM_LABELS.get(system, system)} {variant} {encoding if system != 'a' else ''}".strip()
            if kind == "batch":
                label += f" (batch jobs of {BATCH_JOB_SIZE})"
            ax.plot([r["throughput"] for r in rs], [r["p99_ms"] for r in rs], color=colour, marker=marker,
                    linestyle=style, label=label, markersize=7)
            for r in rs:
                ax.annotate(str(r["concurrency"]), (r["throughput"], r["p99_ms"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (predictions/s, log)")
        ax.set_ylabel("p99 latency (ms, log)")
        ax.set_title("reference PatchTST (512x7 -> 96)" if model == "ref" else "small PatchTST (96x5 -> 24)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle("Throughput vs p99 latency; point labels: requests in flight (in-process: batch size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def result_stem(host: str, when: float | None = None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-") or "host"
    return f"{time.strftime('%Y-%m-%d', time.localtime(when))}-{safe}"


def write(run: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<date>-<host>.md``, ``.json`` and ``.png`` under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(run["meta"]["host"])
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    targets = compute_targets(run["records"])
    try:
        plot(run["records"], paths["png"])
    except Exception as exc:  # a plot failure must not lose the numbers
        run.setdefault("failures", []).append({"system": "report", "step": "plot", "error": repr(exc)})
    paths["md"].write_text(render_markdown(run, targets, paths["png"].name), encoding="utf-8")
    paths["json"].write_text(json.dumps(_clean({**run, "targets": targets}), indent=2, default=_json_default,
                                        allow_nan=False) + "\n", encoding="utf-8")
    return paths


def _clean(value: Any) -> Any:
    """NaN and infinity become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
