"""DeltaCache on the real engine (tiny random Llama, CPU): one load per cold tenant, refcounts, LRU eviction,
queueing for slots, pinning, version replacement, host-tier byte limit, and the slots' contents."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from deltaserve.delta_store.format import DeltaFormatError, load_delta
from deltaserve.delta_store.host_tier import map_tensors, read_pinned_delta
from deltaserve.delta_store.registry import NoDelta, TenantNotFound, TenantStore
from deltaserve.delta_store.tiers import CacheEvent, CacheFull, DeltaCache
from deltaserve.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams
from store_deltas import make_delta

TENANTS = ["t0", "t1", "t2", "t3"]


@pytest.fixture(scope="module")
def delta_files(tiny_base, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tier_deltas")
    return [make_delta(tiny_base, folder / f"d{i}.safetensors", seed=i) for i in range(len(TENANTS) + 1)]


def make_engine(tiny_base: Path, max_slots: int, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_base), max_slots=max_slots, num_kv_blocks=64, **kw))


@pytest.fixture
def store(tmp_path, tiny_base, delta_files) -> TenantStore:
    engine_view = make_engine(tiny_base, 1)
    store = TenantStore(tmp_path / "store", engine_view.base_fingerprint, engine_view.base_shapes)
    for name, delta in zip(TENANTS, delta_files):
        store.create_tenant(name)
        store.put_delta(name, delta)
    return store


class Recorder:
    """Metrics callback that keeps every event; ``gate`` holds host-tier misses (the start of a disk
    read, on the load's worker thread) until opened, so a test can look at the cache mid-load."""

    def __init__(self, gated: bool = False):
        self.events: list[CacheEvent] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, event: CacheEvent) -> None:
        self.events.append(event)
        if event.kind == "miss" and event.tier == "host":
            self.entered.set()
            assert self.gate.wait(10), "test never opened the gate"

    def count(self, kind: str, tier: str = "gpu") -> int:
        return sum(1 for e in self.events if e.kind == kind and e.tier == tier)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def slots_of(cache: DeltaCache) -> dict[str, int]:
    return {s.tenant: s.slot for s in cache.stats().slots if not s.stale}


def test_cold_load_then_hit(tiny_base, store):
    rec = Recorder()
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9, metrics=rec)

    async def body():
        slot = await cache.acquire("t0")
        assert [(e.kind, e.tier) for e in rec.events] == [
            ("miss", "gpu"), ("miss", "host"), ("load", "host"), ("load", "gpu")
        ]
        assert 0 < rec.events[2].seconds <= rec.events[3].seconds
        cache.release("t0", slot)
        assert await cache.acquire("t0") == slot
        cache.release("t0", slot)

    run(body())
    stats = cache.stats()
    assert stats.hits == {"gpu": 1} and stats.misses == {"gpu": 1, "host": 1}
    assert stats.loads == 1 and stats.load_seconds_total > 0
    assert stats.host_tenants == ["t0"] and stats.host_bytes == store.current_version("t0").size_bytes
    assert stats.running_tenants == [] and [s.refcount for s in stats.slots] == [0]


def test_unknown_tenant_and_missing_delta(tiny_base, store):
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=0)
    store.create_tenant("empty")
    with pytest.raises(TenantNotFound):
        run(cache.acquire("nobody"))
    with pytest.raises(NoDelta):
        run(cache.acquire("empty"))
    assert cache.stats().slots == [] and cache.stats().waiting_tenants == []


def test_concurrent_acquires_share_one_load_while_others_run(tiny_base, store):
    rec = Recorder(gated=True)
    cache = DeltaCache(store, make_engine(tiny_base, 3), host_bytes_limit=10**9, metrics=rec)

    async def body():
        rec.gate.set()
        warm = await cache.acquire("t1")
        rec.gate.clear()
        rec.entered.clear()
        waiters = [asyncio.create_task(cache.acquire("t0")) for _ in range(5)]
        assert await asyncio.to_thread(rec.entered.wait, 10)  # t0's load is now blocked in its thread
        # The event loop is free: a warm tenant is served while t0 loads.
        again = await asyncio.wait_for(cache.acquire("t1"), 1)
        assert again == warm
        assert not any(w.done() for w in waiters)
        assert cache.stats().waiting_tenants == ["t0"]
        rec.gate.set()
        slots = await asyncio.gather(*waiters)
        assert len(set(slots)) == 1 and slots[0] != warm
        return slots[0]

    slot = run(body())
    assert rec.count("load") == 2  # t1 and t0: the five t0 acquires shared one
    info = {s.tenant: s for s in cache.stats().slots}
    assert info["t0"].refcount == 5 and info["t0"].slot == slot and info["t1"].refcount == 2
    assert cache.stats().running_tenants == ["t0", "t1"]


def test_full_slots_queue_and_in_use_is_never_evicted(tiny_base, store):
    rec = Recorder()
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9, metrics=rec)

    async def body():
        s0, s1 = await cache.acquire("t0"), await cache.acquire("t1")
        queued = [asyncio.create_task(cache.acquire("t2")), asyncio.create_task(cache.acquire("t3"))]
        await settle()
        assert not any(q.done() for q in queued)
        assert cache.stats().waiting_tenants == ["t2", "t3"]
        assert rec.count("eviction") == 0 and slots_of(cache) == {"t0": s0, "t1": s1}
        cache.release("t1", s1)
        s2 = await queued[0]  # first come, first served
        assert s2 == s1 and slots_of(cache) == {"t0": s0, "t2": s2}
        await settle()
        assert not queued[1].done()  # t0 and t2 are both in use
        cache.release("t0", s0)
        assert await queued[1] == s0
        assert slots_of(cache) == {"t2": s1, "t3": s0}

    run(body())
    assert rec.count("eviction") == 2


def test_newcomer_does_not_jump_the_queue(tiny_base, store):
    cache = DeltaCache(store, make_engine(tiny_base, 1), host_bytes_limit=10**9)
    order: list[str] = []

    async def use(tenant: str) -> None:
        async with cache.lease(tenant):
            order.append(tenant)
            await asyncio.sleep(0)

    async def body():
        s0 = await cache.acquire("t0")
        queued = asyncio.create_task(use("t1"))
        await settle()
        cache.release("t0", s0)
        # This coroutine runs on into acquire before the queued task can: a free slot is in sight,
        # but t1 asked first.
        await use("t2")
        await queued

    run(body())
    assert order == ["t1", "t2"]


def test_lru_picks_least_recently_used(tiny_base, store):
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9)

    async def body():
        async with cache.lease("t0"):
            pass
        async with cache.lease("t1"):
            pass
        async with cache.lease("t0"):  # t0 is now the most recently used
            pass
        async with cache.lease("t2"):
            pass

    run(body())
    assert set(slots_of(cache)) == {"t0", "t2"}


def test_cancelled_waiter_does_not_leak_a_reference(tiny_base, store):
    rec = Recorder(gated=True)
    cache = DeltaCache(store, make_engine(tiny_base, 1), host_bytes_limit=10**9, metrics=rec)

    async def body():
        first = asyncio.create_task(cache.acquire("t0"))
        second = asyncio.create_task(cache.acquire("t0"))
        assert await asyncio.to_thread(rec.entered.wait, 10)
        first.cancel()  # e.g. the client went away during the load
        await settle()
        rec.gate.set()
        slot = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        assert cache.stats().slots[0].refcount == 1
        cache.release("t0", slot)
        # The one slot is free again: another tenant can take it.
        async with cache.lease("t1"):
            pass

    run(body())


def test_failed_load_reaches_every_waiter_and_frees_the_slot(tiny_base, store):
    # A slot too small for the delta: the engine refuses it with a ValueError.
    engine = make_engine(tiny_base, 2, slot_bits_per_param=0.001)
    cache = DeltaCache(store, engine, host_bytes_limit=10**9)

    async def body():
        results = await asyncio.gather(*(cache.acquire("t0") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert "slot holds" in str(results[0])

    run(body())
    stats = cache.stats()
    assert stats.slots == [] and stats.loads == 0 and stats.waiting_tenants == []


def test_pin_keeps_tenant_resident(tiny_base, store):
    rec = Recorder()
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9, metrics=rec)

    async def body():
        pinned = await cache.pin("t0")
        assert cache.is_pinned("t0")
        for tenant in ["t1", "t2", "t3", "t1"]:
            async with cache.lease(tenant) as slot:
                assert slot != pinned
        assert slots_of(cache)["t0"] == pinned
        with pytest.raises(CacheFull):
            await cache.pin("t1")  # one slot always stays for unpinned tenants
        cache.unpin("t0")
        async with cache.lease("t2"):
            pass
        async with cache.lease("t3"):
            pass
        assert "t0" not in slots_of(cache)

    run(body())
    assert rec.count("load") == 7  # every lease but the pinned tenant's needed a load: two slots, one pinned


def test_new_version_serves_new_requests_old_one_until_released(tiny_base, store, delta_files):
    rec = Recorder()
    cache = DeltaCache(store, make_engine(tiny_base, 3), host_bytes_limit=10**9, metrics=rec)

    async def body():
        old = await cache.acquire("t0")
        v2 = store.put_delta("t0", delta_files[-1])
        await cache.refresh("t0")
        info = {s.slot: s for s in cache.stats().slots}
        assert info[old].stale and info[old].refcount == 1  # still serving the running sequence
        assert cache.stats().host_tenants == []
        new = await cache.acquire("t0")
        assert new != old
        assert {s.slot: s.version for s in cache.stats().slots} == {old: 1, new: v2.version}
        cache.release("t0", old)
        assert [s.slot for s in cache.stats().slots] == [new]
        cache.release("t0", new)

    run(body())
    assert rec.count("eviction") == 1 and rec.count("load") == 2


def test_version_change_is_seen_without_refresh(tiny_base, store, delta_files):
    """Another process (or a missed refresh) replaced the delta: the next acquire still loads the new one."""
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9)

    async def body():
        async with cache.lease("t0"):
            pass
        store.put_delta("t0", delta_files[-1])
        async with cache.lease("t0"):
            pass

    run(body())
    assert [(s.tenant, s.version) for s in cache.stats().slots] == [("t0", 2)]


def test_refresh_reloads_a_pinned_tenant_and_forget_drops_it(tiny_base, store, delta_files):
    cache = DeltaCache(store, make_engine(tiny_base, 2), host_bytes_limit=10**9)

    async def body():
        await cache.pin("t0")
        store.put_delta("t0", delta_files[-1])
        await cache.refresh("t0")
        assert [(s.tenant, s.version, s.pinned) for s in cache.stats().slots] == [("t0", 2, True)]
        store.delete_tenant("t0")
        await cache.forget("t0")
        assert not cache.is_pinned("t0") and cache.stats().slots == []

    run(body())


def test_host_tier_respects_byte_limit(tiny_base, store):
    sizes = {t: store.current_version(t).size_bytes for t in TENANTS}
    limit = sizes["t0"] + sizes["t1"] + sizes["t2"] // 2  # room for two deltas, not three
    rec = Recorder()
    cache = DeltaCache(store, make_engine(tiny_base, 1), host_bytes_limit=limit, metrics=rec)

    async def body():
        for tenant in ["t0", "t1", "t2"]:
            async with cache.lease(tenant):
                stats = cache.stats()
                assert stats.host_bytes <= limit
        assert cache.stats().host_tenants == ["t1", "t2"]
        async with cache.lease("t1"):  # evicted from the slot, still in host memory
            pass
        async with cache.lease("t0"):  # gone from both tiers: read from disk again
            pass

    run(body())
    assert rec.count("hit", "host") == 1 and rec.count("miss", "host") == 4
    assert rec.count("eviction", "host") == 2 and cache.stats().host_bytes <= limit


def test_host_tier_disabled(tiny_base, store):
    cache = DeltaCache(store, make_engine(tiny_base, 1), host_bytes_limit=0)

    async def body():
        for tenant in ["t0", "t1", "t0"]:
            async with cache.lease(tenant):
                pass

    run(body())
    stats = cache.stats()
    assert stats.host_bytes == 0 and stats.misses["host"] == 3 and "host" not in stats.hits


def greedy_tokens(engine: LLMEngine, slot: int) -> list[int]:
    request = f"r{slot}-{len(engine.seqs)}"
    engine.add_request(request, [5, 17, 42, 7], SamplingParams(max_tokens=6, temperature=0.0), slot=slot)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def test_slots_hold_the_right_deltas_after_eviction_and_reuse(tiny_base, store):
    """Generation through the cache's slot equals generation from a fresh engine given the delta directly."""
    engine = make_engine(tiny_base, 2)
    cache = DeltaCache(store, engine, host_bytes_limit=10**9)
    reference_engine = make_engine(tiny_base, 1)
    expected = {}
    for tenant in TENANTS:
        reference_engine.load_delta(0, load_delta(store.current_version(tenant).path))
        expected[tenant] = greedy_tokens(reference_engine, 0)
    assert len({tuple(v) for v in expected.values()}) > 1  # the deltas really change the output

    async def body():
        for tenant in ["t0", "t1", "t2", "t0", "t3", "t1"]:  # forces evictions and slot reuse
            async with cache.lease(tenant) as slot:
                assert greedy_tokens(engine, slot) == expected[tenant], tenant

    run(body())


def test_other_tenants_keep_decoding_during_a_cold_load(tiny_base, store):
    """On the server's AsyncEngine: a warm tenant's generation runs to the end while t0's load is held."""
    engine = AsyncEngine(EngineConfig(model=str(tiny_base), max_slots=2, num_kv_blocks=64))
    rec = Recorder(gated=True)
    cache = DeltaCache(store, engine, host_bytes_limit=10**9, metrics=rec)

    async def body():
        await engine.start()
        try:
            rec.gate.set()
            warm = await cache.acquire("t1")
            rec.gate.clear()
            rec.entered.clear()
            cold = asyncio.create_task(cache.acquire("t0"))
            assert await asyncio.to_thread(rec.entered.wait, 10)
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            outputs = [out async for out in engine.generate("warm", [5, 17, 42], params, slot=warm)]
            assert outputs[-1].finished and outputs[-1].num_completion_tokens == 12
            assert not cold.done()
            rec.gate.set()
            slot = await cold
            outputs = [out async for out in engine.generate("cold", [5, 17, 42], params, slot=slot)]
            assert outputs[-1].num_completion_tokens == 12
        finally:
            await engine.stop()

    run(body())


def test_pinned_read_equals_load_delta_and_refuses_a_damaged_file(delta_files, tmp_path):
    """The disk tier's read (one buffer, pinned under CUDA) gives load_delta's delta; damage fails the same way."""
    checks = dict(expected_fingerprint=load_delta(delta_files[0]).base_fingerprint)
    original, pinned = load_delta(delta_files[0], **checks), read_pinned_delta(delta_files[0], **checks)
    assert pinned.metadata == original.metadata and pinned.weights.keys() == original.weights.keys()
    for name, weight in original.weights.items():
        for key, tensor in weight.tensors().items():
            assert torch.equal(pinned.weights[name].tensors()[key], tensor)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(delta_files[0].read_bytes()[:-100])
    with pytest.raises(DeltaFormatError):
        read_pinned_delta(damaged, **checks)


def test_map_tensors_rebuilds_every_weight_kind(delta_files):
    """The walk that rebuilds a delta with every tensor mapped (bench/serve_bench_engine pins them; here clone)."""
    original = load_delta(delta_files[0])
    copied = map_tensors(original, lambda t: t.clone())
    assert copied.metadata == original.metadata and copied.weights.keys() == original.weights.keys()
    for name, weight in original.weights.items():
        assert type(copied.weights[name]) is type(weight)
        for key, tensor in weight.tensors().items():
            twin = copied.weights[name].tensors()[key]
            assert torch.equal(twin, tensor) and twin.data_ptr() != tensor.data_ptr()
