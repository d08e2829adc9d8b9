"""The worker-side Celery app: the shared app with the task implementations, signals and control commands.

Start a pool with ``fleet worker --adapter simple --device cpu`` (the batching engine) or
``fleet worker --engine celery``, or with the plain Celery command ``celery -A workers.app worker -Q infer.simple.cpu``.
"""

from shared.celery_app import app
from workers.engines.celery import control, signals, tasks  # noqa: F401  (registering is the import's purpose)

# Celery's consumer, quarantining what it cannot run instead of dropping it (workers/engines/celery/consumer.py),
# on kombu's Redis transport hardened so that no list item can take the worker down (transport.py).
app.conf.worker_consumer = "workers.engines.celery.consumer:FleetConsumer"
app.conf.broker_transport = "workers.engines.celery.transport:Transport"

__all__ = ["app"]
