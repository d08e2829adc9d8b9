"""The FinSight Fleet benchmark: the fleet against the in-process limit, plain Celery, Triton and TorchServe.

Run ``python -m bench run --quick`` (under three minutes) or ``python -m bench run`` (the full run). See
``bench/README.md``.
"""
