"""Decode steps through DecodeGraphs: padded, static-shaped, replayable. Off CUDA the same static step runs
without capture, so the CPU tests check padding, static metadata and the paged decode attention; the GPU
test checks that replayed graphs give the eager engine's tokens."""
from __future__ import annotations

import pytest
import torch

from deltaserve.engine.decode_graphs import decode_buckets
from engine_fixtures import PROMPTS, greedy, make_engine, make_tenants, run_to_end

# Slots per request: base, deltacome, bitdelta, the svd tenant (torch path: those steps stay eager), repeats.
SLOTS = (-1, 0, 1, 2, 0, 1)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    return make_tenants(tmp_path_factory.mktemp("graphs"), "llama_gqa_untied")


def _generate(engine, slots, prompts=PROMPTS, max_tokens=24):
    for i, slot in enumerate(slots):
        engine.add_request(f"r{i}", list(prompts[i % len(prompts)]), greedy(max_tokens), slot)
    return run_to_end(engine)


def test_buckets_cover_every_batch_size():
    for max_seqs in (1, 5, 64, 100, 300):
        buckets = decode_buckets(max_seqs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_seqs and buckets[0] == 1


def test_static_decode_steps_give_the_eager_tokens(tenants):
    eager = _generate(make_engine(tenants, cuda_graphs=False), SLOTS)
    engine = make_engine(tenants, cuda_graphs=True)
    assert _generate(engine, SLOTS) == eager
    # Kernel-path tenants only: test_tenant_mixes_replay_covering_graphs_until_they_recur.


def _covering(keys) -> bool:
    """Whether a graph's keys (DeltaRows.graph_key) are a covering graph's: 16-row tiles for any mix, every kernel
    variant of every kind launched."""
    return all(k is None or (k[0][0] == 16 and k[1] and all(t.decode and t.dot for t in k[2])) for k in keys)


@pytest.mark.parametrize("exact_after", [1, 3])
def test_tenant_mixes_replay_covering_graphs_until_they_recur(tenants, exact_after):
    """exact_graph_after=3: a tenant mix's first two decode steps replay its batch size's covering graph (every
    kernel variant launched), the third captures its own; 1: each mix its own graph at once, no covering graph.
    The tokens are the eager engine's either way."""
    slots = (0, 1, -1, 0, 0, 0, 0)   # kernel-path tenants: tl.dot tiles for slot 0 once its five rows decode
    engine = make_engine(tenants, cuda_graphs=True, exact_graph_after=exact_after)
    graphs = engine.runner.graphs
    assert _generate(engine, slots) == _generate(make_engine(tenants, cuda_graphs=False), slots)
    tenant_keys = [kinds for _, kinds in graphs._graphs if kinds is not None]
    covering = [kinds for kinds in tenant_keys if _covering(kinds)]
    if exact_after == 1:
        assert not covering and graphs.covering_steps == 0 and len({k for k in tenant_keys}) >= 2
    else:
        assert covering and graphs.covering_steps >= exact_after - 1
        assert len(covering) < len(tenant_keys)   # recurring mixes got graphs of their own
        assert all(n < exact_after for key, n in graphs._seen.items() if key not in graphs._graphs)


def test_a_tenants_many_rows_replay_one_graph_on_their_own_tiles(tenants):
    """17 rows of one tenant: its own graph is captured on one 32-row tile (SlotMetadata.from_host's fit_tiles),
    not on the two 16-row tiles of a covering graph, and gives the eager engine's tokens."""
    slots = (0,) * 17
    prompts = [[250, 3], [64, 9, 7]]
    room = dict(num_kv_blocks=128, max_num_batched_tokens=32)   # all 17 decoding in one step
    engine = make_engine(tenants, cuda_graphs=True, **room)
    assert (_generate(engine, slots, prompts, max_tokens=12) ==
            _generate(make_engine(tenants, cuda_graphs=False, **room), slots, prompts, max_tokens=12))
    tiles = {key[1][0][0] for key in engine.runner.graphs._graphs if key[1] is not None}
    assert (32, 1) in tiles and all(tile[0] in (16, 32) for tile in tiles)   # fewer rows as requests finish


def test_a_reloaded_slot_changes_the_static_steps_output(tenants):
    """Graphs read slot buffers, not copies: a tenant loaded after the first step shows in the next one."""
    engine = make_engine(tenants, cuda_graphs=True)
    first = _generate(engine, (0, 0))
    engine.load_delta(0, tenants.deltas[1])             # the bitdelta tenant's delta into slot 0
    moved = _generate(engine, (0, 0))
    reference = _generate(make_engine(tenants, cuda_graphs=False), (1, 1))
    assert moved == reference and moved != first
    # Back by a planned load (one batched copy into the same buffers): the same graphs replay the new bytes.
    engine.load_planned(0, tenants.deltas[0], engine.plan_load(0, tenants.deltas[0]))
    assert _generate(engine, (0, 0)) == first


def test_base_graphs_are_made_up_front_and_outlive_a_layout_change(tenants):
    """capture_base prepares every bucket's base-model step before any request; a slot-layout change then drops the
    steps with tenant rows (they read slot buffers) and keeps the base ones (they read none)."""
    engine = make_engine(tenants, cuda_graphs=True)
    graphs = engine.runner.graphs
    graphs.capture_base()
    base = {key: g for key, g in graphs._graphs.items()}
    assert sorted(pad for pad, kinds in base) == graphs.buckets and all(kinds is None for _, kinds in base)
    assert _generate(engine, (0, -1, 0)) == _generate(make_engine(tenants, cuda_graphs=False), (0, -1, 0))
    assert any(kinds is not None for _, kinds in graphs._graphs)
    engine.load_delta(0, tenants.deltas[1])   # slot 0 packed -> bitdelta: no slot holds packed deltas any more
    reference = make_engine(tenants, cuda_graphs=False)
    reference.load_delta(0, tenants.deltas[1])
    assert _generate(engine, (-1, 0)) == _generate(reference, (-1, 0))
    assert all(graphs._graphs[key] is g for key, g in base.items())
    assert all(kinds is None or kinds[0] is None for _, kinds in graphs._graphs)   # no step of the old layout


@pytest.mark.gpu
@pytest.mark.parametrize("exact_after", [1, 3])
def test_cuda_graph_replay_matches_eager(tenants, exact_after):
    """exact_after=3: the first steps of each mix replay covering graphs (every kernel variant)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    slots = (0, 1, -1, 1, 0, -1, 0)
    kw = dict(device="cuda", dtype="float32")
    eager = _generate(make_engine(tenants, cuda_graphs=False, **kw), slots)
    engine = make_engine(tenants, cuda_graphs=True, exact_graph_after=exact_after, **kw)
    graphs = engine.runner.graphs
    assert graphs.captures == len(graphs.buckets) and graphs.capture_seconds > 0   # the base graphs, at start-up
    assert _generate(engine, slots) == eager
    assert graphs.captures > len(graphs.buckets) and (graphs.covering_steps > 0) == (exact_after > 1)
    assert _generate(engine, slots[:3]) == _generate(make_engine(tenants, cuda_graphs=False, **kw), slots[:3])
    # Slot 0 swapped to the bitdelta tenant by a planned load, then back: the captured graphs follow.
    for delta in (tenants.deltas[1], tenants.deltas[0]):
        plan = engine.plan_load(0, delta)
        assert plan is not None
        engine.write_planned(plan)      # host to device on the runner's copy stream
        assert engine.runner.bank.commit_plan(plan)
        reference = make_engine(tenants, cuda_graphs=False, **kw)
        reference.load_delta(0, delta)
        assert _generate(engine, slots) == _generate(reference, slots)
