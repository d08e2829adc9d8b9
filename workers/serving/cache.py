"""The per-process model cache.

Evicts by all three of: LRU over ``max_models``, a memory budget counted from the real parameter and buffer
bytes of each model, and an idle TTL (a model unused for ``ttl_seconds`` is dropped). Built on cachetools'
``TTLCache``, which already orders by recency, sizes entries and expires them; this module adds the count
bound, idle (not insert-time) expiry, eviction callbacks and counters: hits, misses, evictions by reason, cold
loads with the time they took, and the time each evicted model had been resident (its age at eviction, as
ModelMesh reports it), summed.

Lives inside one worker process; it is thread-safe so that a batching thread and the task thread can share it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

from cachetools import Cache, TTLCache

from shared.errors import ModelLoadError

V = TypeVar("V")
EvictCallback = Callable[[Hashable, Any, str], None]


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {"lru": 0, "memory": 0, "ttl": 0, "copy": 0,
                                                               "manual": 0})
    loads: int = 0
    """Models put in the cache (each one a cold load)."""
    load_seconds: float = 0.0
    """Time those loads took, summed."""
    evicted_age_seconds: float = 0.0
    """Time each model evicted on its own (not by an unload) had been resident, summed."""

    @property
    def total_evictions(self) -> int:
        return sum(v for k, v in self.evictions.items() if k != "manual")

    def snapshot(self) -> dict[str, int]:
        """Integer counters; the sums are rounded totals, so that differences of snapshots lose nothing."""
        return {"hits": self.hits, "misses": self.misses, "evictions": self.total_evictions,
                **{f"evictions_{k}": v for k, v in self.evictions.items()},
                "loads": self.loads, "load_ms": round(self.load_seconds * 1000),
                "evicted_age_s": round(self.evicted_age_seconds)}


class _NotifyingTTLCache(TTLCache):
    """A TTLCache that reports every item it drops on its own, with the reason."""

    def __init__(self, owner: "ModelCache", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner
        self.reason = "memory"  # popitem is called by cachetools when the size budget overflows

    def popitem(self) -> tuple[Hashable, Any]:
        key, value = super().popitem()
        self._owner._evicted(key, value, self.reason)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[Hashable, Any]]:
        expired = super().expire(time)
        for key, value in expired:
            self._owner._evicted(key, value, "ttl")
        return expired


class ModelCache(Generic[V]):
    """LRU + memory budget + idle TTL cache of loaded models.

    Args:
        max_models: at most this many entries.
        max_bytes: the sum of entry sizes stays at or under this.
        ttl_seconds: an entry not read or written for this long is evicted.
        sizeof: the size in bytes of a value (the model's real parameter and buffer bytes).
        on_evict: called as ``on_evict(key, value, reason)`` after an entry leaves on its own
            (reason ``lru``, ``memory`` or ``ttl``) or by :meth:`pop` (``manual``, ``copy``); it unloads the model.
        timer: the clock of the idle TTL and of the ages at eviction (a fake one in tests).
    """

    def __init__(self, max_models: int, max_bytes: int, ttl_seconds: float, sizeof: Callable[[V], int],
                 on_evict: EvictCallback | None = None, timer: Callable[[], float] = time.monotonic) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.counters = CacheCounters()
        self.timer = timer
        self._inserted: dict[Hashable, float] = {}
        self._on_evict = on_evict
        self._sizeof = sizeof
        self._lock = threading.RLock()
        self._cache = _NotifyingTTLCache(self, maxsize=max_bytes, ttl=ttl_seconds, timer=timer, getsizeof=sizeof)

    def _evicted(self, key: Hashable, value: V, reason: str) -> None:
        self.counters.evictions[reason] = self.counters.evictions.get(reason, 0) + 1
        inserted = self._inserted.pop(key, None)
        if inserted is not None and reason != "manual":
            self.counters.evicted_age_seconds += max(0.0, self.timer() - inserted)
        if self._on_evict is not None:
            self._on_evict(key, value, reason)

    def get(self, key: Hashable) -> V | None:
        """The value if cached (a hit, which also refreshes recency and idle time), else None (a miss)."""
        with self._lock:
            self._cache.expire()
            value = self._cache.get(key)
            if value is None:
                self.counters.misses += 1
                return None
            self.counters.hits += 1
            self._cache[key] = value  # NOTE: re-setting restarts the idle TTL; TTLCache counts from insert
            return value

    def _quiet_get(self, key: Hashable) -> V | None:
        # NOTE: TTLCache.__getitem__ moves the key to the recent end; reads that are not a use (peek, listing)
        # go through the plain Cache lookup so that they leave the LRU order alone.
        if key not in self._cache:  # TTLCache.__contains__ checks expiry and does not touch the order
            return None
        return Cache.__getitem__(self._cache, key)

    def peek(self, key: Hashable) -> V | None:
        """The value without counting a lookup or refreshing it."""
        with self._lock:
            self._cache.expire()
            return self._quiet_get(key)

    def put(self, key: Hashable, value: V, load_seconds: float = 0.0) -> None:
        """Insert a freshly loaded model (a cold load that took ``load_seconds``), evicting least recently used
        entries until the count and the memory budget hold."""
        size = self._sizeof(value)
        if size > self.max_bytes:
            raise ModelLoadError(
                f"model {key} needs {size / 2**20:.1f} MB, more than the whole cache budget "
                f"({self.max_bytes / 2**20:.1f} MB)")
        with self._lock:
            self._cache.expire()
            if key in self._cache:
                self.pop(key)
            self._cache.reason = "lru"
            try:
                while len(self._cache) >= self.max_models:
                    self._cache.popitem()
            finally:
                self._cache.reason = "memory"
            self._cache[key] = value
            self._inserted[key] = self.timer()
            self.counters.loads += 1
            self.counters.load_seconds += max(0.0, load_seconds)

    def pop(self, key: Hashable, reason: str = "manual") -> V | None:
        """Remove an entry on request: an unload job (reason ``manual``), or the pool making room by dropping a
        model other processes also hold (``copy``); the eviction callback runs with the reason."""
        with self._lock:
            value = self._cache.pop(key, None)
            if value is not None:
                self._evicted(key, value, reason)
            return value

    def expire(self) -> list[Hashable]:
        """Evict idle entries now (called periodically so that idle models go even without traffic)."""
        with self._lock:
            return [key for key, _ in self._cache.expire()]

    def clear(self) -> None:
        with self._lock:
            for key in list(self._cache.keys()):
                self.pop(key)

    def items(self) -> list[tuple[Hashable, V]]:
        """Entries (in insertion order); listing them is not a use."""
        with self._lock:
            self._cache.expire()
            return [(key, self._quiet_get(key)) for key in list(self._cache.keys())]

    def __contains__(self, key: Hashable) -> bool:
        return self.peek(key) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def current_bytes(self) -> int:
        return int(self._cache.currsize)
