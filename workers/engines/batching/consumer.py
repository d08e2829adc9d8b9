"""One batching-engine consumer: a worker process that takes batches off its pool's queue and runs them.

It keeps Celery's wire contract — producers ``send_task('fleet.predict', kwargs={'job': ...})`` on
``infer.<adapter>.<device>``, results land in Celery's result backend — and changes only how messages are taken:
one Lua call (:mod:`workers.engines.batching.fetch`) pops up to ``BATCH_MAX_BATCH_SIZE`` messages, records them
as unacknowledged and held by this process and begins their jobs; the executor runs them (one forward per model)
and stores results, records, events, stats and the acks in one MULTI. Task events go out once per batch.

With cache-aware routing (:mod:`shared.routing`) the consumer also takes jobs from its own queue, those the router
sent it because it holds their model, before the pool queue's of the same priority; idle, it steals from the
busiest other process of its pool.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from shared import routing
from shared.celery_wire import message_ids, read_message
from shared.errors import FleetError, InvalidInputError
from shared.tasks import PREDICT
from workers.engines.batching.fetch import BatchFetcher, Fetched
from workers.engines.batching.redelivery import Redelivery, ack
from workers.executor import deadletters
from workers.executor.delivery import Begun, Delivery
from workers.executor.policies import Skip
from workers.process import ProcessContext
from workers.reaper import Reaper

log = logging.getLogger(__name__)


class Consumer:
    """Consumes one pool queue in batches until :meth:`stop` (the batch in hand is finished first)."""

    def __init__(self, context: ProcessContext, queue: str, events: Any = None, slot: Any = None,
                 stop: threading.Event | None = None) -> None:
        self.context = context
        self.queue = queue
        self.redis = context.redis
        settings = context.settings
        self.keys = context.keys
        self.held_key = self.keys.worker_deliveries(context.worker_id)
        member = context.member
        self.fetcher = BatchFetcher(self.redis, routing.redis_list_keys(queue), self.keys, context.worker_id,
                                    settings.result_ttl_seconds, settings.batch.max_batch_size,
                                    own_lists=member.lists if member is not None else ())
        self.redelivery = Redelivery(self.redis, self.keys)
        self.reaper = Reaper(self.redis, self.keys, settings.worker_lost_after_seconds,
                             visibility_timeout_s=2 * settings.job_time_limit_seconds)
        self.events = events
        self.slot = slot
        """Shared with the supervisor: ``busy_since`` (0 when idle) and jobs done, per task kind."""
        self._stop = stop or threading.Event()

    def stop(self, *_: Any) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def decode(self, batch: Fetched) -> tuple[list[Delivery], list[Begun], list[bytes]]:
        """Messages -> deliveries; an unreadable one is refused (its job fails typed and its message is
        dead-lettered) and one with no job id to fail is quarantined: the third list, dead letters to write."""
        deliveries, begun, quarantined = [], [], []
        for raw, started in zip(batch.raws, batch.begun):
            tag, job_id = message_ids(raw)
            try:
                msg = read_message(raw)
                delivery = Delivery(msg.task_id, msg.task, msg.kwargs.get("job"), tag=msg.tag, queue=self.queue)
            except Exception as exc:
                log.error("refused message %s (job %s): %s", tag, job_id, exc)
                refused = exc if isinstance(exc, FleetError) else InvalidInputError(
                    f"the message cannot be read: {type(exc).__name__}: {exc}")
                delivery = Delivery(job_id or "", "", None, tag=tag, refused=refused, queue=self.queue, raw=raw)
            if started is None:  # the fetch could not read it either: nothing recorded, nothing to ack
                delivery.tag = None
                delivery.raw = raw
                delivery.refused = delivery.refused or InvalidInputError("the message is not a kombu envelope")
                if not delivery.job_id:
                    log.error("quarantined a message that is not a task message: %r", raw[:200])
                    quarantined.append(deadletters.entry(delivery, delivery.refused, 1, "unreadable"))
                    continue
                started = Begun(batch.started_at, False, 1, False)
            deliveries.append(delivery)
            begun.append(started)
        return deliveries, begun, quarantined

    def _ack(self, pipe: Any, deliveries: Sequence[Delivery]) -> None:
        ack(pipe, self.held_key, [d.tag for d in deliveries if d.tag])

    def handle(self, batch: Fetched) -> None:
        deliveries, begun, quarantined = self.decode(batch)
        if quarantined:
            pipe = self.redis.pipeline(transaction=True)
            for letter in quarantined:
                deadletters.push(pipe, self.keys, self.queue, letter)
            pipe.execute()
        if self.events is not None:
            for d in deliveries:
                self.events.received(d.job_id, d.task, routing_key=self.queue)
                self.events.started(d.job_id)
            if any(d.task != PREDICT for d in deliveries):
                self.events.flush()  # a long job: let Flower show it running now
        outcomes = self.context.executor.run(deliveries, begun, ack=self._ack)
        runtime = time.time() - batch.started_at
        if self.slot is not None:
            self.slot.done(len(deliveries))
        if self.events is not None:
            for d, outcome in zip(deliveries, outcomes):
                if isinstance(outcome, Exception):
                    self.events.failed(d.job_id, runtime, f"{type(outcome).__name__}({str(outcome)!r})")
                elif not isinstance(outcome, Skip):
                    self.events.succeeded(d.job_id, runtime)
            self.events.flush()

    def _steal(self) -> Fetched | None:
        """With nothing in its own or the pool queue, take half of what waits behind the busiest other process
        when as many wait there as the router sends it at most (``ROUTING_MAX_BACKLOG``): a holder that keeps up
        serves its own models, one that fell behind does not keep jobs waiting while a process idles. The thief
        loads the model if it lacks it, and so becomes one more holder of a model busy enough to need it."""
        member = self.context.member
        if member is None:
            return None
        found = member.busiest(self.context.settings.routing.max_backlog)
        if found is None:
            return None
        lists, waiting = found
        batch = self.fetcher.steal(lists, min(self.fetcher.max_messages, (waiting + 1) // 2))
        return batch if batch.raws else None

    def run(self) -> None:
        log.info("batching consumer %s on %s (and its own queue), batches of up to %d", self.context.worker_id,
                 self.queue, self.fetcher.max_messages)
        registered = False
        stranded = False
        while not self._stop.is_set():
            try:
                if not registered:  # listed before the first fetch: the reaper knows whom to check
                    self.redis.sadd(self.keys.delivery_holders(), self.context.worker_id)
                    registered = True
                if stranded:
                    # NOTE: a batch whose outcomes could not be stored (Redis went away mid-batch) is still held
                    # by this live process, so neither the supervisor nor the reaper would give it back: it goes
                    # back now that Redis answers, and runs again (a job whose outcome did land is skipped).
                    self.redelivery.give_back_held(self.context.worker_id)
                    self.redis.sadd(self.keys.delivery_holders(), self.context.worker_id)
                    stranded = False
                self.reaper.maybe_run()  # lost workers, then the visibility sweep
                batch = self.fetcher.fetch(block_s=0)
                if not batch.raws:
                    batch = self._steal() or self.fetcher.fetch(block_s=1.0)
            except Exception as exc:
                log.error("fetching from Redis failed (%s); retrying", exc)
                self._stop.wait(1.0)
                continue
            if not batch.raws:
                continue
            if self.slot is not None:
                self.slot.busy(batch.started_at)
            try:
                self.handle(batch)
            except Exception:  # the batch stays held and unacked: given back at the top of the loop
                log.exception("a batch of %d failed outside the jobs; it goes back to the queue", len(batch.raws))
                stranded = True
            finally:
                if self.slot is not None:
                    self.slot.busy(0.0)
