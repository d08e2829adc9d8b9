"""Routing: the only place that maps (adapter, device) to a queue.

Queue names are public (``infer.<adapter>.<device>``, e.g. ``infer.simple.cpu``) so that any Celery producer
can send jobs to a pool. :func:`route_task` is installed as Celery's router: it reads ``adapter`` and
``device`` from the job payload, falling back to the settings' defaults.
"""

from __future__ import annotations

from typing import Any, Iterable

from kombu import Exchange, Queue

from shared.settings import FleetSettings, get_settings

ADAPTERS: tuple[str, ...] = ("simple", "torchscript", "torchserve", "triton")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
QUEUE_PREFIX = "infer"
#: Priority levels the Redis transport keeps as separate lists (a job's priority 0-9 lands in the nearest).
PRIORITY_STEPS: list[int] = [0, 3, 6, 9]
#: Separator kombu puts between a queue name and its priority step in the Redis list name.
#: NOTE: kombu's own default: any Celery client configured with nothing but the broker URL reads and writes the
#: same lists (priority tasks, and the reply lists of remote control).
PRIORITY_SEP = "\x06\x16"


def queue_name(adapter: str, device: str) -> str:
    """The public queue of a pool. Raises ``ValueError`` for an unknown adapter or device."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    return f"{QUEUE_PREFIX}.{adapter}.{device}"


def parse_queue_name(name: str) -> tuple[str, str]:
    prefix, _, rest = name.partition(".")
    adapter, _, device = rest.partition(".")
    if prefix != QUEUE_PREFIX:
        raise ValueError(f"not a fleet queue: {name!r}")
    queue_name(adapter, device)  # validates
    return adapter, device


def broker_priority(priority: int) -> int:
    """The Celery ``priority`` for a fleet priority (9 = most urgent).

    NOTE: kombu's Redis transport serves its lowest priority number first, the reverse of the fleet's (and
    AMQP's) scale, so the number is flipped here, in one place.
    """
    return 9 - max(0, min(9, int(priority)))


def pool_of(adapter: str | None, device: str | None, settings: FleetSettings | None = None) -> tuple[str, str]:
    """The pool ``(adapter, device)`` of a job that names them or not: the one place defaults are applied."""
    settings = settings or get_settings()
    return adapter or settings.serving_adapter_type, device or settings.default_device


def queue_for_job(job: dict[str, Any] | None, settings: FleetSettings | None = None) -> str:
    """The queue a job payload goes to: its ``adapter``/``device`` or the configured defaults."""
    job = job or {}
    return queue_name(*pool_of(job.get("adapter"), job.get("device"), settings))


def all_queues() -> list[Queue]:
    """Every pool queue, declared on one direct exchange (routing key = queue name)."""
    exchange = Exchange(QUEUE_PREFIX, type="direct")
    return [
        Queue(queue_name(a, d), exchange, routing_key=queue_name(a, d), queue_arguments={"x-max-priority": 9})
        for a in ADAPTERS
        for d in DEVICES
    ]


def pools_from_spec(spec: str) -> list[str]:
    """Queue names from an ``adapter:device,adapter:device`` spec (as in ``POOLS``)."""
    queues = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        adapter, _, device = item.partition(":")
        queues.append(queue_name(adapter, device or "cpu"))
    return queues


def _step_list(queue: str, step: int) -> str:
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def redis_list_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority step (to measure queue depth)."""
    return [_step_list(queue, step) for step in PRIORITY_STEPS]


def priority_list(queue: str, broker_priority: int) -> str:
    """The list kombu keeps messages of ``broker_priority`` (0 = served first) in (its ``_q_for_pri``)."""
    clamped = max(0, min(int(broker_priority or 0), PRIORITY_STEPS[-1]))
    return _step_list(queue, max(s for s in PRIORITY_STEPS if s <= clamped))


def route_task(name: str, args: Iterable[Any], kwargs: dict[str, Any], options: dict[str, Any],
               task: Any = None, **_: Any) -> dict[str, Any] | None:
    """Celery router: fleet tasks go to the queue their job names; other tasks keep Celery's default."""
    if not name.startswith("fleet."):
        return None
    job = (kwargs or {}).get("job")
    queue = queue_for_job(job if isinstance(job, dict) else None)
    return {"queue": queue, "routing_key": queue, "exchange": QUEUE_PREFIX}
