"""What limits each missed target: the lead's reading of the profiles, printed under the targets table.

Sources: py-spy of the API and of a direct-engine worker under saturation (reference model, msgpack tensors),
per-process CPU read from ``/proc`` around a 10 s load (API ~1.2 ms, the two workers ~5.9 ms together, Redis
~0.3 ms per prediction), and the CPU columns of the run itself (server CPU includes Redis; client CPU is the load
generator's, on the same two cores). The arithmetic below uses the committed run (2026-11-25): on two shared
cores, throughput ~= 2000 ms / (server + client CPU ms per prediction), and every system fits it within ~5 %.
"""

from __future__ import annotations

_CELERY_CLIENT = (
    "On this 2-core machine the load generator shares the servers' cores, and a Celery client (send_task, then "
    "AsyncResult.get: a subscription, a GET of the meta and the JSON decode per task) costs ~2.0 CPU ms per "
    "request against 0.1-0.3 ms for the aiohttp / tritonclient clients of (d), (e) and (f). ")
_PER_JOB = (
    "The fleet's own server CPU per prediction with the direct engine is 6.2 ms (Redis included) against 5.3 ms "
    "for the bare forward (a), 5.8 ms for Triton and 6.1 ms for TorchServe; Celery's prefork worker needs "
    "12.2 ms. Server 6.2 + client 2.0 ms = 8.3 CPU ms per prediction on 2 cores caps the run at ~240/s, which is "
    "what it measured: the rest of the gap is the client's share of the cores. ")

LIMITS: dict[str, str] = {
    "c-vs-a": _CELERY_CLIENT + _PER_JOB + (
        "Reaching 70 % of (a) (263/s: 7.6 CPU ms per prediction in all) with this client on the same cores would "
        "need the server side at 5.6 ms, Redis included: within 0.3 ms of the bare forward. Through the HTTP API, "
        "whose client is cheap, the same workers reach 0.71x (a)."),
    "c-vs-b": _PER_JOB + (
        "(b) pays the same client cost; the fleet also writes a job record, an event and stats per job (one MULTI "
        "per batch) and acknowledges late, which plain Celery does not."),
    "c-vs-b2": _CELERY_CLIENT + _PER_JOB + (
        "celery-batches (6.4 ms server + 1.8 ms client) pays the same client and acknowledges early; the two are "
        "level (both ~237/s). Beating it by 25 % needs ~6.8 CPU ms per prediction in all, i.e. a server side at "
        "4.8 ms: below the bare forward. Not reachable on shared cores with a Celery client."),
    "c-batch-vs-a": (
        "Batch jobs run as forwards of 8 (the fastest size per row) in one process each; the server spends "
        "6.15 ms per item against 5.3 for the bare forward: validating 64 payloads, normalising and "
        "de-normalising each, one PredictionResult each and one 640 kB result to encode. The Celery client then "
        "spends ~0.95 ms per item decoding that result with the standard library's JSON (Celery's backend "
        "decoder), on the same cores: 6.15 + 0.95 ms per item caps the run at ~282/s (measured 288/s)."),
    "c-c1-p50": (
        "A lone job through Celery's client: send_task (~1.3 ms of client CPU before the message reaches Redis), "
        "the worker's wake-up and one fetch round trip, the forward with caches gone cold between requests, the "
        "result MULTI, and the client's result path (~1.3 ms: the published meta, a GET, the decode). The "
        "fleet's own part is two Redis round trips; the rest is Celery's client. This point moves +-1.5 ms "
        "between runs on this VM (8.5-11.4 ms seen for the same configuration today)."),
    "c-small-vs-b": _CELERY_CLIENT + (
        "For the small model the forward is ~0.3 ms per row, so the client and the broker are nearly all the "
        "cost: 3x (b)'s 431/s needs ~1.5 CPU ms per prediction in all, less than the Celery client alone "
        "(1.7 ms). The fleet's server side is not what limits it: through the HTTP API (client 0.15 ms) the same "
        "workers serve the small model at ~1,200/s, 2.8x (b)."),
    "d-vs-f": (
        "The fleet's HTTP path costs 7.05 server CPU ms per prediction: the two workers and Redis ~5.85 ms (as "
        "much as Triton or TorchServe spend in all) plus the Python API process ~1.2 ms (aiohttp, body "
        "validation, the record + message MULTI, the shared subscription, the document read and its JSON). "
        "1.2x TorchServe's 312/s needs 5.3 ms per prediction in all: the bare forward alone. TorchServe's "
        "frontend is Java and hands requests to its workers without a broker hop."),
    "d-vs-e": (
        "Triton's C++ frontend and in-server batcher cost ~0.5 ms per request over the forward; the fleet's HTTP "
        "path adds a broker hop and a Python API process (~1.2 ms, see the (d) vs (f) note). With the API on "
        "cores of its own (machines with more than two cores: the pools scale apart from the API) the workers' "
        "5.85 ms per prediction would match Triton's 5.8 ms."),
    "d-p99-vs-e": "Same cause as the throughput gap: at 64 in flight the queue in front of slower workers is longer.",
    "d-p99-vs-f": (
        "TorchServe's frontend queues in order and hands out batches of up to 32 as workers free up; the fleet "
        "runs the same closed loop ~15 % slower (see above), and a job that misses one worker's batch waits "
        "for the next, so the tail is a batch time longer."),
}
