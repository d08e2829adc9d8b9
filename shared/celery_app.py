"""The Celery app factory shared by producers and workers.

Producers only ``send_task`` by name (:mod:`shared.tasks`), so this module never imports the workers' code;
``workers.app`` registers the task implementations on the same app.
"""

from __future__ import annotations

from celery import Celery

from shared import redis_options, routing
from shared.settings import FleetSettings, get_settings, soft_time_limit

#: Serializers the fleet speaks. Pickle is never accepted: a pickled message is refused by the consumer.
ACCEPTED_CONTENT = ["json", "msgpack"]


#: Seconds after which kombu itself gives an unacknowledged message back (see the transport options below).
KOMBU_LAST_RESORT_S = 86400


def create_celery_app(settings: FleetSettings | None = None, name: str = "finsight-fleet") -> Celery:
    """Build the fleet's Celery app for ``settings`` (process-wide settings by default)."""
    settings = settings or get_settings()
    # The password and the TLS options of the broker and the result backend (Flower inherits them).
    connection = redis_options.celery_config(settings)
    app = Celery(name, broker=connection["broker_url"], backend=connection["result_backend"])
    hard_limit = settings.job_time_limit_seconds
    visibility = 2 * hard_limit
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=ACCEPTED_CONTENT,
        result_accept_content=ACCEPTED_CONTENT,
        event_serializer="json",
        # A job is acknowledged only after it finished and its result was stored: a worker that dies mid-job
        # leaves the message to be delivered again, and a child killed by the OS is requeued at once.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # NOTE: one prefetched message per process. Jobs vary from sub-millisecond predicts to model loads of
        # seconds; a larger multiplier would park jobs behind a slow one in a busy process while an idle
        # process waits. Batching pools raise it on purpose (they need several jobs in hand to batch).
        worker_prefetch_multiplier=1,
        task_time_limit=hard_limit,
        task_soft_time_limit=soft_time_limit(hard_limit),
        result_expires=settings.result_ttl_seconds,
        result_extended=False,
        # NOTE: no STARTED state in the result backend: workers mark jobs running in the job record, in the same
        # round trip as the cancellation check, instead of one more write per job.
        task_track_started=False,
        # NOTE: no task-sent events from producers: each is one more PUBLISH per job, made under a process-wide
        # lock (it serialised a threaded producer; the benchmark found it). Flower learns of jobs from the
        # workers' received / started / succeeded events.
        task_send_sent_event=False,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # NOTE: Redis has no real acks: kombu gives a delivered, unacked message back after this, whoever holds
            # it. The fleet's reaper (workers/reaper.py) does that job instead: a lost worker's deliveries at once,
            # unknown holders' after 2 x the time limit, never a live worker's. kombu's own sweep stays only as
            # the last resort, a day late, so that a pool with a short time limit never takes a long job from a
            # live worker of another pool.
            "visibility_timeout": max(visibility, KOMBU_LAST_RESORT_S),
            # Sweep for messages of dead workers a few times per visibility timeout (one ZRANGE each), not
            # kombu's default of every 100 s, so that redelivery follows the timeout closely.
            "unacked_restore_interval": max(1, min(60, visibility // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": routing.PRIORITY_STEPS,
            "sep": routing.PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"retry_policy": {"max_retries": 3}},
        task_queues=routing.all_queues(),
        task_default_queue=routing.queue_name(settings.serving_adapter_type, settings.default_device),
        task_routes=(routing.route_task,),
        # Let Redis tell the worker about a lost connection quickly instead of hanging on a dead socket.
        redis_socket_timeout=30,
        redis_socket_connect_timeout=5,
        broker_heartbeat=0,
        **connection,
    )
    return app


app = create_celery_app()
