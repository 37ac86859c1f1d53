"""DeltaCache: which tenant's delta sits in which engine slot, loaded on demand from host memory or disk.

Tiers, each LRU: disk (the TenantStore) -> host memory (HostTier, byte limit) -> engine slots
(engine.config.max_slots). A request calls ``acquire(tenant)`` for a slot index and ``release`` when its
sequence ends. Invariants:
- a slot with refcount > 0 (sequences running or about to) is never evicted or overwritten;
- one load per (tenant, version), however many requests wait for it; the load runs in a worker thread,
  so the event loop keeps stepping other tenants meanwhile;
- when no slot can be freed, acquirers queue in FIFO order until a release frees one;
- after a new version is uploaded, the old copy keeps serving the sequences that hold it and is dropped
  when the last one releases; new acquires load the new version.
All methods are called on the event loop's thread; only the load itself runs elsewhere.

Freed slots are not cleared (engine.clear_slot): no sequence can reference a free slot, the next
load_delta replaces its whole contents, and clearing would wait for the engine's step lock on the event
loop. The same holds for a slot a failed load left half written.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Literal

from deltaserve.delta_store.host_tier import HostTier, read_pinned_delta
from deltaserve.delta_store.registry import DeltaVersion, TenantStore


@dataclass(frozen=True)
class CacheEvent:
    """One thing the cache did, for metrics. tier "gpu" = engine slots, "host" = host memory."""

    kind: Literal["hit", "miss", "load", "eviction"]
    tier: Literal["gpu", "host"]
    tenant: str
    seconds: float = 0.0  # for "load": gpu = the whole acquire-side load, host = disk read + validation


# Called on the event loop or on a load's worker thread: it must be thread-safe (prometheus-client is).
MetricsCallback = Callable[[CacheEvent], None]


@dataclass(frozen=True)
class SlotInfo:
    slot: int
    tenant: str
    version: int
    refcount: int
    pinned: bool
    ready: bool  # False while loading
    stale: bool  # a newer version exists; dropped at the last release


@dataclass(frozen=True)
class CacheStats:
    max_slots: int
    slots: list[SlotInfo]  # occupied slots only
    host_bytes: int
    host_bytes_limit: int
    host_tenants: list[str]
    running_tenants: list[str]  # hold a slot (refcount > 0)
    waiting_tenants: list[str]  # queued for a slot or a load
    hits: dict[str, int]  # per tier
    misses: dict[str, int]
    evictions: dict[str, int]
    loads: int
    load_seconds_total: float


class CacheFull(ValueError):
    pass


@dataclass(eq=False)
class _Entry:
    tenant: str
    version: DeltaVersion
    slot: int
    loaded: asyncio.Future  # result None once the engine holds the delta
    refcount: int = 0
    last_used: int = 0
    stale: bool = False


@dataclass(eq=False)
class _Waiter:
    woken: asyncio.Future | None = None


@dataclass
class _Counters:
    hits: Counter = field(default_factory=Counter)
    misses: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    loads: int = 0
    load_seconds_total: float = 0.0


class DeltaCache:
    def __init__(self, store: TenantStore, engine, host_bytes_limit: int, metrics: MetricsCallback | None = None):
        self._store = store
        self._engine = engine
        self._metrics = metrics
        self._max_slots: int = engine.config.max_slots
        self._slots: list[_Entry | None] = [None] * self._max_slots
        self._current: dict[str, _Entry] = {}  # tenant -> entry of its current version
        self._pinned: set[str] = set()
        self._host = HostTier(host_bytes_limit, on_evict=lambda t: self._emit("eviction", "host", t))
        # Acquirers waiting for a slot, FIFO. Each waits on its own future rather than an asyncio.Condition:
        # release() must be callable from synchronous cleanup code, and Condition.notify needs its lock,
        # which only an await can take.
        self._queue: deque[_Waiter] = deque()
        self._waiting = Counter()
        self._tick = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._counters = _Counters()
        self._counters_lock = threading.Lock()  # events also come from load threads

    # ---- public API ----------------------------------------------------------------------------

    async def acquire(self, tenant: str) -> int:
        """Slot holding ``tenant``'s current delta, loading it if needed; pair with release(tenant, slot).

        Raises TenantNotFound / NoDelta from the store, or the load's error (e.g. ValueError when the
        engine finds that the delta does not fit a slot).
        """
        self._store.current_version(tenant)  # unknown tenant or no delta: fail before queueing
        self._waiting[tenant] += 1  # queued for a slot or for the load (stats' waiting_tenants)
        try:
            entry = await self._claim(tenant)
            if entry.loaded.done():  # failed loads leave the slot table before failing, so done = loaded
                self._emit("hit", "gpu", tenant)
                return entry.slot
            self._emit("miss", "gpu", tenant)
            try:
                # shield: a cancelled request (client gone) must not cancel a load other requests await.
                await asyncio.shield(entry.loaded)
            except BaseException:
                self._unref(entry)
                raise
            return entry.slot
        finally:
            self._waiting[tenant] -= 1
            if not self._waiting[tenant]:
                del self._waiting[tenant]

    def release(self, tenant: str, slot: int) -> None:
        entry = self._slots[slot] if 0 <= slot < self._max_slots else None
        if entry is None or entry.tenant != tenant or entry.refcount == 0:
            raise ValueError(f"release of slot {slot} for tenant {tenant!r} without a matching acquire")
        self._unref(entry)

    @asynccontextmanager
    async def lease(self, tenant: str) -> AsyncIterator[int]:
        """``async with cache.lease(t) as slot:`` = acquire, then release however the block ends."""
        slot = await self.acquire(tenant)
        try:
            yield slot
        finally:
            self.release(tenant, slot)

    async def pin(self, tenant: str) -> int:
        """Load ``tenant`` and keep its current version in a slot until unpin. One slot always stays unpinned."""
        if tenant not in self._pinned and len(self._pinned) >= self._max_slots - 1:
            raise CacheFull(f"cannot pin {tenant!r}: at most {self._max_slots - 1} of {self._max_slots} slots may be pinned")
        newly = tenant not in self._pinned
        self._pinned.add(tenant)
        try:
            async with self.lease(tenant) as slot:
                return slot
        except BaseException:
            if newly:
                self._pinned.discard(tenant)
            raise

    def unpin(self, tenant: str) -> None:
        self._pinned.discard(tenant)
        self._wake()

    def is_pinned(self, tenant: str) -> bool:
        return tenant in self._pinned

    async def refresh(self, tenant: str) -> None:
        """Call after a new version was stored: cached copies of the old one are dropped (those in use once
        released), and a pinned tenant has its new version loaded before this returns."""
        self._invalidate(tenant)
        if tenant in self._pinned:
            await self.pin(tenant)

    async def forget(self, tenant: str) -> None:
        """Call after deleting a tenant: unpinned, cached copies dropped (those in use once released)."""
        self.unpin(tenant)
        self._invalidate(tenant)

    def stats(self) -> CacheStats:
        host_bytes, host_tenants = self._host.snapshot()
        occupied = [e for e in self._slots if e is not None]
        with self._counters_lock:
            c = self._counters
            return CacheStats(
                max_slots=self._max_slots,
                slots=[
                    SlotInfo(e.slot, e.tenant, e.version.version, e.refcount, e.tenant in self._pinned and not e.stale,
                             e.loaded.done(), e.stale)
                    for e in occupied
                ],
                host_bytes=host_bytes, host_bytes_limit=self._host.limit_bytes, host_tenants=host_tenants,
                running_tenants=sorted({e.tenant for e in occupied if e.refcount > 0}),
                waiting_tenants=sorted(self._waiting),
                hits=dict(c.hits), misses=dict(c.misses), evictions=dict(c.evictions),
                loads=c.loads, load_seconds_total=c.load_seconds_total,
            )

    # ---- slots ---------------------------------------------------------------------------------

    async def _claim(self, tenant: str) -> _Entry:
        """Take a reference on the tenant's entry, starting its load or queueing for a slot as needed.

        Slots go first come, first served: only the head of the queue (or a newcomer when nobody queues)
        may take a free or evictable slot, so a stream of new tenants cannot starve a queued one. Joining
        a resident or loading entry takes no slot and is allowed from anywhere in the queue.
        """
        me: _Waiter | None = None
        try:
            while True:
                version = self._store.current_version(tenant)  # again after each wait: it may have changed
                entry = self._current.get(tenant)
                if entry is not None and entry.version != version:
                    self._invalidate(tenant)  # a newer version was stored since this one loaded
                    entry = None
                my_turn = not self._queue if me is None else self._queue[0] is me
                if entry is None and my_turn:
                    slot = self._free_slot()
                    if slot is not None:
                        entry = self._start_load(tenant, version, slot)
                if entry is not None:
                    entry.refcount += 1
                    entry.last_used = next(self._tick)
                    return entry
                if me is None:
                    me = _Waiter()
                    self._queue.append(me)
                me.woken = asyncio.get_running_loop().create_future()
                await me.woken
        finally:
            if me is not None:
                self._queue.remove(me)
                self._wake()  # the next in line may take a slot now

    def _invalidate(self, tenant: str) -> None:
        self._host.drop(tenant)
        entry = self._current.pop(tenant, None)
        if entry is not None:
            entry.stale = True
            self._drop_if_unused(entry)

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used evictable one (unreferenced, loaded, not pinned)."""
        for slot, entry in enumerate(self._slots):
            if entry is None:
                return slot
        victims = [e for e in self._slots if e.refcount == 0 and e.loaded.done() and e.tenant not in self._pinned]
        if not victims:
            return None
        victim = min(victims, key=lambda e: e.last_used)
        self._slots[victim.slot] = None
        self._current.pop(victim.tenant, None)
        self._emit("eviction", "gpu", victim.tenant)
        return victim.slot

    def _start_load(self, tenant: str, version: DeltaVersion, slot: int) -> _Entry:
        loaded = asyncio.get_running_loop().create_future()
        # A load whose every waiter was cancelled would log "exception never retrieved"; retrieve it here.
        loaded.add_done_callback(lambda f: f.cancelled() or f.exception())
        entry = _Entry(tenant, version, slot, loaded)
        self._slots[slot] = entry
        self._current[tenant] = entry
        task = asyncio.create_task(self._load(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return entry

    async def _load(self, entry: _Entry) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self._load_into_slot, entry.version, entry.slot)
        except BaseException as exc:
            if self._slots[entry.slot] is entry:
                self._slots[entry.slot] = None
            if self._current.get(entry.tenant) is entry:
                del self._current[entry.tenant]
            if isinstance(exc, asyncio.CancelledError):
                entry.loaded.cancel()
            else:
                entry.loaded.set_exception(exc)
            self._wake()
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - start
        with self._counters_lock:
            self._counters.loads += 1
            self._counters.load_seconds_total += seconds
        self._emit("load", "gpu", entry.tenant, seconds)
        entry.loaded.set_result(None)
        self._drop_if_unused(entry)  # replaced or invalidated while it loaded
        self._wake()  # if every acquirer of this load gave up, its slot is evictable now

    def _load_into_slot(self, version: DeltaVersion, slot: int) -> None:
        """Worker thread: host tier or disk -> engine slot."""
        delta = self._host.get(version)
        if delta is None:
            self._emit("miss", "host", version.tenant)
            start = time.perf_counter()
            # Validated again, not only at upload: a file damaged on disk must fail here, not in a kernel.
            delta = read_pinned_delta(version.path, expected_fingerprint=self._store.base_fingerprint,
                                      base_shapes=self._store.base_shapes)
            self._host.put(version, delta)
            self._emit("load", "host", version.tenant, time.perf_counter() - start)
        else:
            self._emit("hit", "host", version.tenant)
        self._engine.load_delta(slot, delta)

    def _unref(self, entry: _Entry) -> None:
        entry.refcount -= 1
        entry.last_used = next(self._tick)
        if entry.refcount == 0:
            self._drop_if_unused(entry)
            self._wake()

    def _drop_if_unused(self, entry: _Entry) -> None:
        """Free the slot of a stale entry once no sequence references it and its load has finished."""
        if entry.stale and entry.refcount == 0 and entry.loaded.done() and self._slots[entry.slot] is entry:
            self._slots[entry.slot] = None
            self._emit("eviction", "gpu", entry.tenant)
            self._wake()

    def _wake(self) -> None:
        """Wake every queued acquirer to re-check; they run in queue order (futures resolve in that order)."""
        for waiter in self._queue:
            if not waiter.woken.done():
                waiter.woken.set_result(None)

    def _emit(self, kind: str, tier: str, tenant: str, seconds: float = 0.0) -> None:
        counter = {"hit": self._counters.hits, "miss": self._counters.misses, "eviction": self._counters.evictions}.get(kind)
        if counter is not None:
            with self._counters_lock:
                counter[tier] += 1
        if self._metrics is not None:
            self._metrics(CacheEvent(kind, tier, tenant, seconds))
