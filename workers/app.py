"""The worker-side Celery app: the shared app with the task implementations, signals and control commands.

Start a pool with ``fleet worker --adapter simple --device cpu`` (the batching engine) or
``fleet worker --engine celery``, or with the plain Celery command ``celery -A workers.app worker -Q infer.simple.cpu``.
"""

from shared.celery_app import app
from workers.engines.celery import control, signals, tasks  # noqa: F401  (registering is the import's purpose)

__all__ = ["app"]
