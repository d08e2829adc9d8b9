"""The FinSight Fleet contract shared by the producer API and the workers.

Nothing in this package imports torch: producers (the API, other services) import it to validate payloads,
route jobs and read results; workers import it to consume them.
"""

__version__ = "0.1.0"
