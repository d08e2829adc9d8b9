"""Every Redis key name and TTL the fleet writes, in one place.

Celery's own keys (queues, ``celery-task-meta-<id>``) are named by Celery; the helpers here name them too so
that nothing else spells them. All fleet keys start with a configurable prefix so that tests can share a Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds after which a worker that stopped heart-beating counts as gone.
WORKER_HEARTBEAT_TTL_S = 30
#: How often a worker refreshes its heartbeat.
WORKER_HEARTBEAT_INTERVAL_S = 5
#: Seconds a model's stats hash (and the set that lists it) lives after its last write: the stats of a model
#: removed from the store, or no longer served, expire instead of being listed forever.
MODEL_STATS_TTL_S = 7 * 24 * 3600
#: Dead letters kept per pool queue (the oldest are dropped past it): bounded, like everything a client can grow.
DEAD_LETTERS_MAX = 10_000
#: Latency histogram bucket upper bounds, in milliseconds (Prometheus ``le`` labels; +Inf is implicit).
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
#: Seconds a model's holder set lives after the last heartbeat of any holder (stale members are also filtered by
#: liveness when read).
MODEL_HOLDERS_TTL_S = 4 * WORKER_HEARTBEAT_TTL_S
#: Seconds a model stays assigned to the process the router placed it on before that process has loaded it (and
#: lists itself as a holder): later jobs of the model follow the first instead of placing it again elsewhere.
MODEL_ASSIGNED_TTL_S = 15
#: Celery's result key prefix (redis backend).
CELERY_RESULT_PREFIX = "celery-task-meta-"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix. Build with ``Keys(settings.redis_key_prefix)``."""

    prefix: str = "fleet"

    # -- jobs ------------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        """Hash: the job's record (kind, model, adapter, device, timestamps, worker, status)."""
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Pub/sub channel: each state change of the job, as JSON."""
        return f"{self.prefix}:job-events:{job_id}"

    def api_watch_idle(self) -> str:
        """Pub/sub channel nobody publishes on: keeps the API's shared watch connection subscribed."""
        return f"{self.prefix}:api-watch-idle"

    def job_cancelled(self, job_id: str) -> str:
        """String: present when the job was cancelled (workers check it before and during work)."""
        return f"{self.prefix}:job-cancelled:{job_id}"

    @staticmethod
    def celery_result(job_id: str) -> str:
        return f"{CELERY_RESULT_PREFIX}{job_id}"

    # -- stats -----------------------------------------------------------------------------------------------
    def model_stats(self, model_id: str) -> str:
        """Hash: prediction counters, latency sum and histogram of one model, over the whole fleet; expires
        :data:`MODEL_STATS_TTL_S` after its last write."""
        return f"{self.prefix}:stats:model:{model_id}"

    def worker_stats(self, worker_id: str) -> str:
        """Hash: counters, cache counters, memory, models loaded, start time and heartbeat of one worker."""
        return f"{self.prefix}:stats:worker:{worker_id}"

    def fleet_stats(self) -> str:
        """Hash: counters summed over every worker that ever served."""
        return f"{self.prefix}:stats:fleet"

    def stats_models(self) -> str:
        """Set: model ids that have stats (readers drop the members whose hash expired)."""
        return f"{self.prefix}:stats:models"

    def workers(self) -> str:
        """Sorted set: worker id -> last heartbeat (unix seconds)."""
        return f"{self.prefix}:workers"

    def worker_deliveries(self, worker_id: str) -> str:
        """Hash: delivery tag -> "job id, task, fetch time" of what a batching-engine process holds (fetch to ack).

        Its supervisor gives them back to their queue the moment the process dies, instead of leaving them to
        the visibility timeout.
        """
        return f"{self.prefix}:worker-deliveries:{worker_id}"

    def dead_letters(self, queue: str) -> str:
        """List: the dead letters of one pool queue, oldest first (JSON entries, see ``workers.executor.deadletters``;
        at most :data:`DEAD_LETTERS_MAX` are kept)."""
        return f"{self.prefix}:dead-letters:{queue}"

    def delivery_holders(self) -> str:
        """Set: ids of the processes that hold deliveries (``Keys.worker_deliveries``): what the reaper checks."""
        return f"{self.prefix}:delivery-holders"

    def reaper_lock(self) -> str:
        """String: held (SET NX EX) by the one live worker that reaps lost workers now."""
        return f"{self.prefix}:reaper-lock"

    def worker_models(self, worker_id: str) -> str:
        """Hash: model id -> JSON ``ModelInfo`` of the models this worker process holds now."""
        return f"{self.prefix}:worker-models:{worker_id}"

    # -- cache-aware routing (see shared.routing) -----------------------------------------------------------
    def worker_queue(self, worker_id: str) -> str:
        """Base name of one consumer process's own queue: jobs the router sent to it because it holds (or was
        placed) their model. Its lists are ``routing.redis_list_keys(base)``, one per priority step, in kombu's
        envelope; the messages keep their pool queue as routing key, so any redelivery returns them to the pool."""
        return f"{self.prefix}:worker-queue:{worker_id}"

    def routing_members(self, queue: str) -> str:
        """Sorted set: id -> placement cost of the consumer processes of a pool that consume an own queue (lower:
        loading a new model there evicts less). Each process writes its own member; its supervisor or the reaper
        removes it when it is gone."""
        return f"{self.prefix}:routing:{queue}:members"

    def model_holders(self, queue: str, model_id: str) -> str:
        """Set: ids of the pool's consumer processes that hold the model now (each process adds and removes
        itself; expires :data:`MODEL_HOLDERS_TTL_S` after the last refresh)."""
        return f"{self.prefix}:routing:{queue}:holders:{model_id}"

    def model_assigned(self, queue: str, model_id: str) -> str:
        """String: the process the router last placed the model on (written by the router only, with
        :data:`MODEL_ASSIGNED_TTL_S`)."""
        return f"{self.prefix}:routing:{queue}:assigned:{model_id}"

    # -- API keys and rate limits ----------------------------------------------------------------------------
    def api_key(self, key_hash: str) -> str:
        """Hash: one API key by the SHA-256 of its secret (name, scopes, rate limit, created / last used)."""
        return f"{self.prefix}:api-key:{key_hash}"

    def api_key_names(self) -> str:
        """Hash: key name -> SHA-256 of its secret (names are unique; ``fleet keys revoke NAME`` looks here)."""
        return f"{self.prefix}:api-key-names"

    def rate_limits(self) -> str:
        """Prefix of the ``limits`` library's counters (one per key and scope bucket, expiring with the window)."""
        return f"{self.prefix}:ratelimit"
