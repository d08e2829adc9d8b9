"""Prometheus metrics, one registry per app (tests build many apps; the global registry would collide).

Two sources: what this API process saw itself (jobs it enqueued, cancelled or could not send; how long the
jobs it waited on took end to end), and the fleet's shared state in Redis (stats hashes, queues, each pool's
backlog), read once per scrape into a :class:`~producer_api.fleetview.FleetSnapshot` that a custom collector
turns into metric families (the inference latency histogram is rebuilt from the workers' ``h:<le>`` bucket
fields).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from producer_api.fleetview import snapshot
from shared.backlog import PoolBacklog
from shared.keys import Keys

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: End-to-end buckets (seconds): sub-millisecond predicts to model loads of a minute.
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _le_seconds(le_ms: str) -> str:
    return le_ms if le_ms == "+Inf" else f"{float(le_ms) / 1000.0:g}"


def _backlog(backlogs: dict[str, PoolBacklog]) -> Iterator[Metric]:
    """The autoscaling signal: per pool, jobs queued, routed to a process's own queue, and in hand."""
    by_kind = GaugeMetricFamily("fleet_pool_backlog", "Jobs of each pool not yet finished, by where they are "
                                "(queued: the pool queue's priority lists; routed: its processes' own queues; "
                                "in_hand: fetched or running, not yet acknowledged).", labels=["queue", "kind"])
    # NOTE: a gauge, though named _total: the sum of the kinds, the one series an autoscaler's query reads.
    total = GaugeMetricFamily("fleet_pool_backlog_total", "Jobs of each pool not yet finished (queued + routed + "
                              "in hand): what KEDA scales the pool on.", labels=["queue"])
    for queue, backlog in sorted(backlogs.items()):
        for kind, count in backlog.kinds().items():
            by_kind.add_metric([queue, kind], count)
        total.add_metric([queue], backlog.total)
    yield by_kind
    yield total


class FleetCollector(Collector):
    """Yields the fleet's metrics from the last snapshot the scrape handler stored."""

    def __init__(self) -> None:
        self.snapshot: Any = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        fleet = snap.fleet
        predictions = CounterMetricFamily("fleet_predictions", "Predictions finished by the fleet, by outcome.",
                                          labels=["status"])
        predictions.add_metric(["ok"], fleet.successful_predictions)
        predictions.add_metric(["failed"], fleet.failed_predictions)
        yield predictions
        buckets = [(_le_seconds(le), count) for le, count in fleet.latency_histogram_ms.items()]
        yield HistogramMetricFamily("fleet_inference_latency_seconds",
                                    "Inference latency of successful predictions, measured by workers.",
                                    buckets=buckets or [("+Inf", 0)], sum_value=snap.latency_sum_ms / 1000.0)
        depth = GaugeMetricFamily("fleet_queue_depth", "Jobs waiting in each pool queue (every priority list).",
                                  labels=["queue"])
        for queue, length in sorted(snap.queue_depths.items()):
            depth.add_metric([queue], length)
        yield depth
        yield from _backlog(snap.backlogs)
        yield GaugeMetricFamily("fleet_workers_live", "Worker processes with a fresh heartbeat.",
                                value=snap.workers_live)
        yield GaugeMetricFamily("fleet_models_loaded", "Models held by live worker processes (copies counted).",
                                value=fleet.models_loaded)
        yield GaugeMetricFamily("fleet_memory_mb", "Memory of the models held by live workers.",
                                value=fleet.total_memory_mb)
        cache = CounterMetricFamily("fleet_cache_lookups", "Model cache lookups by workers.", labels=["result"])
        cache.add_metric(["hit"], fleet.cache_hits)
        cache.add_metric(["miss"], fleet.cache_misses)
        yield cache
        evictions = CounterMetricFamily("fleet_cache_evictions", "Models evicted from worker caches, by reason.",
                                        labels=["reason"])
        by_reason = dict(fleet.cache_evictions_by_reason)
        unexplained = fleet.cache_evictions - sum(by_reason.values())
        if unexplained > 0:  # workers that predate per-reason counters
            by_reason["other"] = by_reason.get("other", 0) + unexplained
        for reason, count in sorted(by_reason.items()):
            evictions.add_metric([reason], count)
        yield evictions
        yield GaugeMetricFamily("fleet_cache_hit_ratio", "Model cache hits / lookups over the fleet.",
                                value=fleet.cache_hit_ratio)
        yield CounterMetricFamily("fleet_model_loads", "Models loaded into worker caches (cold loads).",
                                  value=snap.cache_loads)
        yield CounterMetricFamily("fleet_model_load_seconds", "Time worker caches spent loading models.",
                                  value=snap.cache_load_ms / 1000.0)
        yield CounterMetricFamily("fleet_cache_evicted_age_seconds",
                                  "Summed age (time since load) of the models evicted from worker caches.",
                                  value=snap.cache_evicted_age_s)


class ApiMetrics:
    """The app's registry: its own counters and histogram, plus the fleet collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("fleet_api_jobs", "Jobs handled by this API process, by kind and status "
                            "(queued: sent; rejected: the broker was unreachable; cancelled: by a client while "
                            "queued; cancel_requested: a running job asked to stop).",
                            ["kind", "status"], registry=self.registry)
        self.job_latency = Histogram("fleet_api_job_latency_seconds",
                                     "Enqueue to final state, for jobs this API process waited on.",
                                     ["kind"], buckets=E2E_BUCKETS, registry=self.registry)
        self.fleet = FleetCollector()
        self.registry.register(self.fleet)

    async def render(self, redis: Any, keys: Keys) -> bytes:
        """Read the fleet's state, then render the registry in Prometheus' text format."""
        # NOTE: no await between storing the snapshot and rendering, so concurrent scrapes cannot mix.
        self.fleet.snapshot = await snapshot(redis, keys)
        return generate_latest(self.registry)
