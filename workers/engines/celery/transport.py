"""kombu's Redis transport, hardened for the Celery engine: nothing on a queue can take the worker down.

kombu decodes each popped list item as a JSON kombu envelope before Celery sees it; an item that is not one
(invalid UTF-8, not JSON, JSON without the envelope's fields: anything any Redis client can LPUSH) raises in the
transport, outside every handler, and the whole Celery worker exits ("Unrecoverable error"). Here such an item
is wrapped in a well-formed envelope of a content type no worker accepts, carrying the raw bytes; Celery's
consumer refuses it as undecodable, and the fleet's consumer (:mod:`workers.engines.celery.consumer`)
quarantines it in the pool's dead letters. Valid envelopes pass untouched.
"""

from __future__ import annotations

import base64
import uuid
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

#: Content type of the envelope an unreadable item is wrapped in (never in ``accept_content``).
UNREADABLE = "application/x-fleet-unreadable"


def _is_envelope(value: Any, queue: str) -> bool:
    if not isinstance(value, dict) or "body" not in value or not isinstance(value.get("headers", {}), dict):
        return False
    props = value.get("properties")
    if not isinstance(props, dict) or "delivery_tag" not in props:
        return False
    # a producer that left out the delivery info still said which job it meant: keep the envelope readable
    if not isinstance(props.get("delivery_info"), dict):
        props["delivery_info"] = {"exchange": "", "routing_key": queue}
    return True


def envelope(raw: bytes | str, queue: str) -> dict[str, Any]:
    """The kombu envelope ``raw`` holds, or one wrapping ``raw`` as :data:`UNREADABLE` when it holds none."""
    try:
        value = loads(bytes_to_str(raw))
        if _is_envelope(value, queue):
            return value
    except Exception:  # invalid UTF-8, not JSON, too deep: all just unreadable
        pass
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    return {"body": base64.b64encode(data).decode("ascii"), "content-encoding": "binary", "content-type": UNREADABLE,
            "headers": {}, "properties": {"body_encoding": "base64", "priority": 0,
                                          "delivery_info": {"exchange": "", "routing_key": queue},
                                          "delivery_tag": str(uuid.uuid4())}}


class Channel(kombu_redis.Channel):
    # NOTE: kombu's two read paths, each with ``envelope`` in place of its bare ``loads``; otherwise as kombu
    # writes them (kombu 5.x).
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self.connection._deliver(envelope(item, dest), dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    return envelope(item, queue)
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class Transport(kombu_redis.Transport):
    Channel = Channel
