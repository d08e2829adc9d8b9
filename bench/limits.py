"""What limits each missed target: the lead's reading of the profiles, printed under the targets table.

Sources: py-spy of a fleet worker under saturation (solo pool, reference model, msgpack tensors): the forward is
~60 % of the worker's samples; Celery's consumer / strategy / tracer ~15 %; Redis round trips (pipeline
execute) ~10 %; JSON encoding of results ~3 %; pydantic validation and base64 ~2 %. And the per-prediction CPU
columns of the run itself (server CPU includes Redis; client CPU is the load generator's, on the same cores).
"""

from __future__ import annotations

_CELERY_CLIENT = (
    "On this 2-core machine the load generator shares the server's cores. A Celery client costs ~2.9 CPU ms per "
    "request here (send_task, then AsyncResult.get through Celery's result consumer; 2.2-5.5 ms across the Celery "
    "systems) against 0.2-0.8 ms for the aiohttp/tritonclient clients of (d), (e) and (f). ")
_PER_JOB = (
    "With the direct engine the fleet's own server CPU per prediction is down to ~7.5 ms (Redis included) against "
    "6.5 ms for the bare forward, 6.9 ms for Triton and 7.6 ms for TorchServe; Celery's prefork worker needs "
    "~12.9 ms (a fetch, a dispatch through the pool's parent and an ack per message). Server 7.5 + client 2.9 ms "
    "= ~10.4 CPU ms per prediction on 2 cores caps the run at ~190/s, which is what it measured: the rest of the "
    "gap is the client, not the fleet. ")

LIMITS: dict[str, str] = {
    "c-vs-a": _CELERY_CLIENT + _PER_JOB + (
        "Batching cannot close the gap for this model on CPU: the in-process forward of 32 rows is no faster per "
        "row than 32 forwards of one (see (a)), so only per-job overhead can be cut."),
    "c-vs-b": _PER_JOB + (
        "(b) pays the same client cost; the fleet also writes a job record, an event and stats per job (one MULTI "
        "per batch) and acknowledges late, which plain Celery does not."),
    "c-vs-b2": _CELERY_CLIENT + _PER_JOB + (
        "celery-batches pays the same client cost and acks early; at saturation the two are level (both ~190/s), "
        "so beating it by 25 % needs a cheaper client or cores of its own, not a cheaper worker."),
    "c-batch-vs-a": (
        "A batch job of 64 runs as two forwards of 32 in one worker process, so one batch job uses one core; with "
        "4 jobs in flight on 2 processes the cores are busy, and the gap is per-item pre/post-processing "
        "(normalisation, de-normalisation, one PredictionResult per item) and the JSON encoding of 64 results."),
    "c-c1-p50": (
        "A lone job crosses Redis five times (send, BRPOP, the batch fetch, the running record, the result MULTI and "
        "its publish) plus the client's result subscription: ~5 ms over the forward on this machine. Folding the "
        "running record into the fetch script would save one round trip."),
    "c-small-vs-b": _CELERY_CLIENT + (
        "For the small model the forward is ~0.3 ms per row, so the client and the broker are nearly all the cost: "
        "with the client on the same two cores, no broker-based system here exceeds ~400 jobs/s."),
    "d-vs-f": (
        "The API spends ~5-7 CPU ms per request on the same cores (aiohttp, pydantic validation of the body, a "
        "Celery send_task in an executor thread, a Redis subscription per waiting request, the job document), on "
        "top of the worker's cost; TorchServe's frontend is Java and hands requests to its workers directly."),
    "d-vs-e": (
        "Triton's C++ frontend and in-server dynamic batcher add ~0.4 ms per request; the fleet's HTTP path adds a "
        "broker hop and a Python API process (see the (d) vs (f) note)."),
    "d-p99-vs-e": "Same cause as the throughput gap: at 64 in flight the queue in front of slower workers is longer.",
    "d-p99-vs-f": "Same cause as the throughput gap: at 64 in flight the queue in front of slower workers is longer.",
}
