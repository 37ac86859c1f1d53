"""The engine is exact: one mixed batch of base + three tenants (deltacome, bitdelta, svd) gives each row
the greedy tokens of transformers running base + that tenant's reconstructed delta."""
from __future__ import annotations

import pytest

from engine_fixtures import (CASES, INIT, METHODS, PROMPTS, Tenants, greedy, make_engine, make_tenants, merged_greedy,
                             run_to_end)
from deltaserve.engine import EngineConfig, LLMEngine
from tiny_models import make_tiny_model

SLOTS = [-1, 0, 1, 2]


@pytest.fixture(scope="module", params=list(CASES))
def tenants(request, tmp_path_factory):
    return make_tenants(tmp_path_factory.mktemp(request.param), request.param)


def test_mixed_batch_equals_merged_models(tenants):
    engine = make_engine(tenants)
    for i, slot in enumerate(SLOTS):
        engine.add_request(f"r{slot}", list(PROMPTS[i]), greedy(), slot)
    mixed: dict[str, list[int]] = {}
    distinct = set()
    while engine.has_work():
        for out in engine.step():
            mixed.setdefault(out.request_id, []).extend(out.new_token_ids)
        distinct.add(engine.stats().last_distinct_slots)
    assert max(distinct) == len(SLOTS)        # steps held rows of all four tenants at once
    for i, slot in enumerate(SLOTS):
        assert mixed[f"r{slot}"] == merged_greedy(tenants, slot, list(PROMPTS[i])), (
            f"slot {slot} ({METHODS[slot] if slot >= 0 else 'base'})")
    # The deltas matter: the same prompt gives four different continuations.
    for i, slot in enumerate(SLOTS):
        engine.add_request(f"same{slot}", list(PROMPTS[0]), greedy(), slot)
    same = run_to_end(engine)
    assert len({tuple(same[f"same{slot}"]) for slot in SLOTS}) == len(SLOTS)


def test_each_tenant_alone_equals_its_row_in_the_mixed_batch(tenants):
    engine = make_engine(tenants)
    for i, slot in enumerate(SLOTS):
        engine.add_request(f"r{slot}", list(PROMPTS[i]), greedy(), slot)
    mixed = run_to_end(engine)
    for i, slot in enumerate(SLOTS):
        engine.add_request("alone", list(PROMPTS[i]), greedy(), slot)
        assert run_to_end(engine)["alone"] == mixed[f"r{slot}"]


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    # original_max_position_embeddings below the generated length, so every frequency band is exercised.
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    base = make_tiny_model(tmp_path / "llama3", num_key_value_heads=2, rope_scaling=rope, rope_theta=50000.0, **INIT)
    tenants = Tenants(base, [])
    engine = make_engine(tenants, max_slots=1)
    engine.add_request("r", list(PROMPTS[1]), greedy(), -1)
    assert run_to_end(engine)["r"] == merged_greedy(tenants, -1, list(PROMPTS[1]))


def test_kernel_warmup_changes_nothing_the_engine_serves(tmp_path):
    """The start-up kernel warm-up (engine/kernel_warmup.py; by default on CUDA, here in Triton's interpreter)
    launches every delta kernel on synthetic deltas: no KV entry, slot buffer or output of the engine changes."""
    base = make_tiny_model(tmp_path / "base", **INIT)
    settings = dict(model=str(base), num_kv_blocks=16, block_size=4)
    cold = LLMEngine(EngineConfig(**settings))
    warm = LLMEngine(EngineConfig(**settings, kernel_warmup=True))
    assert cold.runner.warmup_launches == 0 and warm.runner.warmup_launches > 0
    # An engine that replays covering decode graphs also launches their every-variant calls.
    covering = LLMEngine(EngineConfig(**settings, kernel_warmup=True, cuda_graphs=True, exact_graph_after=3))
    assert covering.runner.warmup_launches > warm.runner.warmup_launches
    assert not any(k.any() or v.any() for k, v in warm.runner.kv_caches)
    assert warm.runner.bank.layout_key() == cold.runner.bank.layout_key()
    for engine in (cold, warm):
        engine.add_request("r", list(PROMPTS[1]), greedy(8), -1)
    assert run_to_end(warm) == run_to_end(cold)
