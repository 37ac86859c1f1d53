"""Continuous batching, preemption, abort, sampling options, delta slot errors and the async engine."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from deltaserve.engine import AsyncEngine, EngineConfig, SamplingParams
from engine_fixtures import PROMPTS, greedy, make_engine, make_tenants, merged_greedy, merged_model, run_to_end


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    return make_tenants(tmp_path_factory.mktemp("batching"), "llama_gqa_untied")


@pytest.fixture(scope="module")
def solo(tenants):
    """Greedy tokens of each (prompt, slot) run alone in a roomy engine."""
    engine = make_engine(tenants)
    out = {}
    for i, prompt in enumerate(PROMPTS):
        for slot in (-1, 0, 1, 2):
            engine.add_request("x", list(prompt), greedy(), slot)
            out[i, slot] = run_to_end(engine)["x"]
    return out


def test_arrivals_aborts_and_preemption(tenants, solo):
    # 14 blocks of 4 tokens: four requests of up to 43 tokens cannot all hold their KV at once.
    engine = make_engine(tenants, num_kv_blocks=14, max_num_batched_tokens=8)
    plan = {0: [(0, -1), (1, 0)], 3: [(2, 1), (3, 2)], 7: [(1, 2), (0, 1)], 12: [(3, -1)]}
    aborted = {"r3_1": 5, "r12_0": 20}       # request -> step at which the client goes away
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    expected = {}
    step = 0
    while step in plan or engine.has_work() or step < max(plan):
        for j, (prompt, slot) in enumerate(plan.get(step, [])):
            rid = f"r{step}_{j}"
            engine.add_request(rid, list(PROMPTS[prompt]), greedy(), slot)
            expected[rid] = solo[prompt, slot]
        for rid, at in aborted.items():
            if at == step:
                out = engine.abort(rid)
                assert out.finished and out.finish_reason == "abort"
                finished[rid] = "abort"
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        step += 1
    assert engine.scheduler.num_preemptions > 0
    assert set(finished) == set(expected)
    for rid, want in expected.items():
        if rid in aborted:
            assert finished[rid] == "abort" and tokens.get(rid, []) == want[: len(tokens.get(rid, []))]
        else:
            assert finished[rid] == "length" and tokens[rid] == want, rid
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0


def test_seeded_sampling_is_reproducible_across_batches(tenants):
    engine = make_engine(tenants)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    engine.add_request("a", list(PROMPTS[0]), params, 1)
    alone = run_to_end(engine)["a"]
    engine.add_request("a", list(PROMPTS[0]), params, 1)
    engine.add_request("b", list(PROMPTS[1]), dataclasses.replace(params, seed=8), 0)
    engine.add_request("c", list(PROMPTS[0]), dataclasses.replace(params, seed=9), 1)
    batched = run_to_end(engine)
    assert batched["a"] == alone
    assert batched["c"] != alone
    engine.add_request("k1", list(PROMPTS[2]), SamplingParams(max_tokens=10, top_k=1, ignore_eos=True), 2)
    engine.add_request("g", list(PROMPTS[2]), greedy(10), 2)
    engine.add_request("p0", list(PROMPTS[2]), SamplingParams(max_tokens=10, top_p=1e-6, seed=3, ignore_eos=True), 2)
    out = run_to_end(engine)
    assert out["k1"] == out["g"] == out["p0"]
    # top-k = 3 at a high temperature: every sampled token is among the model's 3 most likely.
    hot = SamplingParams(max_tokens=24, temperature=5.0, top_k=3, seed=1, logprobs=3, ignore_eos=True)
    picks = [o.logprobs[0] for o in collect(engine, "hot", list(PROMPTS[3]), hot, 0)]
    assert all(p.token_id in [t.token_id for t in p.top_logprobs] for p in picks)
    assert any(p.token_id != p.top_logprobs[0].token_id for p in picks)     # and not always the first


def collect(engine, rid, prompt, params, slot):
    engine.add_request(rid, prompt, params, slot)
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_stop_strings_stop_tokens_and_logprobs(tenants):
    engine = make_engine(tenants)
    full = collect(engine, "full", list(PROMPTS[1]), greedy(24), 0)
    text = "".join(o.new_text for o in full)
    ids = [t for o in full for t in o.new_token_ids]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = collect(engine, "cut", list(PROMPTS[1]), dataclasses.replace(greedy(24), stop=[stop]), 0)
    assert cut[-1].finish_reason == "stop"
    assert "".join(o.new_text for o in cut) == text[: text.find(stop)]
    by_id = collect(engine, "tok", list(PROMPTS[1]), dataclasses.replace(greedy(24), stop_token_ids=[ids[5]]), 0)
    assert [t for o in by_id for t in o.new_token_ids] == ids[: ids.index(ids[5]) + 1]
    assert by_id[-1].finish_reason == "stop" and by_id[-1].num_completion_tokens == ids.index(ids[5]) + 1
    lp = collect(engine, "lp", list(PROMPTS[1]), dataclasses.replace(greedy(6), logprobs=3), 0)
    assert [o.new_token_ids[0] for o in lp] == ids[:6] and lp[-1].finish_reason == "length"
    for o in lp:
        (entry,) = o.logprobs
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token_id == entry.token_id
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0


def test_penalties_steer_greedy_decoding_as_references_do(tenants):
    """In one batch: a tenant's greedy tokens under a repetition penalty equal transformers' generate with the same
    penalty (prompt and output tokens both penalized); under a presence or a frequency penalty, a loop over the
    merged model's logits with OpenAI's definitions (output tokens only; negative values here, which favour repeats,
    so that each changes this tiny model's tokens); and an unpenalized request keeps its plain greedy tokens."""
    engine = make_engine(tenants)
    prompt, slot, n = list(PROMPTS[1]), 1, 12
    penalties = {"presence": dict(presence_penalty=-2.0), "frequency": dict(frequency_penalty=-1.5),
                 "repetition": dict(repetition_penalty=1.3), "plain": {}}
    for name, fields in penalties.items():
        engine.add_request(name, prompt, dataclasses.replace(greedy(n), **fields), slot)
    out = run_to_end(engine)
    assert out["repetition"] == merged_greedy(tenants, slot, prompt, n, repetition_penalty=1.3)
    assert out["plain"] == merged_greedy(tenants, slot, prompt, n)
    model = merged_model(tenants, slot)
    for name, presence, frequency in (("presence", -2.0, 0.0), ("frequency", 0.0, -1.5)):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids])).logits[0, -1]
                generated = ids[len(prompt):]
                for token in set(generated):
                    logits[token] -= frequency * generated.count(token) + presence
                ids.append(int(logits.argmax()))
        assert out[name] == ids[len(prompt):], name
    assert len({tuple(tokens) for tokens in out.values()}) == len(out), "each penalty changes this model's tokens"


def test_prompt_logprobs_match_the_merged_model(tenants):
    """A tenant's prompt logprobs (OpenAI's echo) over a prompt longer than one prefill chunk equal the merged
    model's log-softmax at every prompt position (the first token has none), with the top alternatives best first;
    a repeat of the prompt scores every token again instead of taking the prefix cache; with max_tokens 0 the request
    ends with its prompt scored."""
    engine = make_engine(tenants)      # 16 tokens a step: this prompt takes two chunks
    prompt, slot = [(7 * i + 3) % 200 + 5 for i in range(23)], 1
    with torch.no_grad():
        want = merged_model(tenants, slot)(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for request in ("first", "again"):
        (first, *_) = collect(engine, request, prompt, dataclasses.replace(greedy(2), prompt_logprobs=2), slot)
        entries = first.prompt_logprobs
        assert [e.token_id for e in entries] == prompt and entries[0].logprob is None
        got = torch.tensor([e.logprob for e in entries[1:]])
        torch.testing.assert_close(got, want[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1))
        for e, row in zip(entries[1:], want):
            assert [t.token_id for t in e.top_logprobs] == row.topk(2).indices.tolist()
    # max_tokens 0 (scoring only): one final output, no token, the same entries.
    (only,) = collect(engine, "score", prompt, dataclasses.replace(greedy(1), max_tokens=0, prompt_logprobs=2), slot)
    assert (only.finished, only.finish_reason, only.new_token_ids) == (True, "length", [])
    assert only.num_completion_tokens == 0
    assert [e.logprob for e in only.prompt_logprobs] == [e.logprob for e in entries]
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(greedy(1), max_tokens=0)


def test_bad_requests_and_deltas_are_refused(tenants):
    engine = make_engine(tenants, max_model_len=40)
    with pytest.raises(ValueError, match="slot 7"):
        engine.add_request("a", [1, 2], greedy(), 7)
    with pytest.raises(ValueError, match="at most 40"):
        engine.add_request("a", [1] * 40, greedy(), -1)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("a", [10**6], greedy(), -1)
    small = make_engine(dataclasses.replace(tenants, deltas=[]), max_slots=1, slot_bits_per_param=0.25)
    with pytest.raises(ValueError, match="slot_bits_per_param"):
        small.load_delta(0, tenants.deltas[0])
    other = dataclasses.replace(tenants.deltas[0], metadata={**tenants.deltas[0].metadata, "base_fingerprint": "x"})
    with pytest.raises(ValueError, match="made for base"):
        engine.load_delta(0, other)
    # Clearing a slot makes it the base model again.
    engine.clear_slot(0)
    engine.add_request("base", list(PROMPTS[0]), greedy(8), -1)
    engine.add_request("cleared", list(PROMPTS[0]), greedy(8), 0)
    out = run_to_end(engine)
    assert out["base"] == out["cleared"]


def test_async_engine_streams_aborts_and_reports(tenants, solo):
    async def main():
        engine = AsyncEngine(EngineConfig(str(tenants.base), max_slots=3, num_kv_blocks=64, block_size=4))
        for slot, delta in enumerate(tenants.deltas):
            await asyncio.to_thread(engine.load_delta, slot, delta)
        await engine.start()

        async def full(rid, prompt, slot):
            outs = [o async for o in engine.generate(rid, list(PROMPTS[prompt]), greedy(), slot)]
            return [t for o in outs for t in o.new_token_ids], outs[-1]

        async def leave_early(rid):
            async for out in engine.generate(rid, list(PROMPTS[3]), greedy(), 1):
                if out.num_completion_tokens == 3:
                    break

        results = await asyncio.gather(full("a", 0, 0), full("b", 1, 2), leave_early("c"), full("d", 2, -1))
        stats = engine.stats()
        await engine.stop()
        return results, stats

    (a, b, _, d), stats = asyncio.run(main())
    assert a[0] == solo[0, 0] and b[0] == solo[1, 2] and d[0] == solo[2, -1]
    assert a[1].finished and a[1].finish_reason == "length" and a[1].num_completion_tokens == 32
    assert stats.kv_blocks_used == 0 and stats.steps_total > 0 and stats.backbone_bytes > 0


def _bank_state(engine) -> tuple:
    """Every slot buffer and the host-side state of an engine's slot bank."""
    bank = engine.runner.bank
    weights = []
    for w in bank.weights.values():
        buffers = [t for t in w.buffers()[:6] if t is not None]
        buffers += [getattr(t, f) for t in w.packed for f in ("v_planes", "v_scales", "u_planes", "u_scales", "s",
                                                                 "ranks", "bits")]
        weights.append(([b.clone() for b in buffers], [set(k) for k in w.kinds], list(w.packed_tiers),
                        set(w.torch_slots), list(w.lr_rank), w.group_size))
    return weights, {k: set(v) for k, v in bank._kind_slots.items()}, bank.group_size, list(bank.generation)


def _assert_same_state(a: tuple, b: tuple) -> None:
    (weights_a, *rest_a), (weights_b, *rest_b) = a, b
    assert rest_a == rest_b
    for (bufs_a, *host_a), (bufs_b, *host_b) in zip(weights_a, weights_b, strict=True):
        assert host_a == host_b
        assert all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b, strict=True))


def test_planned_loads_equal_full_loads(tenants):
    """A load planned as one batched copy, written, then committed, leaves the slot bank exactly as load() does,
    whatever the slot held; a plan that needs a new buffer is not made, one whose buffers were replaced since is
    refused at commit, and one never written cannot be committed."""
    deltacome, bitdelta, svd = tenants.deltas
    planned, full = make_engine(tenants), make_engine(tenants)      # slots: deltacome, bitdelta, svd
    bank = planned.runner.bank
    for slot in (2, 0, 1):
        for delta in (bitdelta, deltacome, bitdelta, deltacome):     # the second time from cached views
            plan = planned.plan_load(slot, delta)
            assert plan is not None
            with pytest.raises(RuntimeError, match="never written"):
                bank.commit_plan(plan)
            bank.write_plan(plan)
            assert bank.commit_plan(plan)
            full.load_delta(slot, delta)
            _assert_same_state(_bank_state(planned), _bank_state(full))
    assert planned.plan_load(0, svd) is None                        # svd takes the torch path: load() only

    fresh = make_engine(dataclasses.replace(tenants, deltas=[deltacome]), max_slots=3)
    assert fresh.plan_load(1, bitdelta) is None                     # no sign buffers yet
    plan = fresh.plan_load(1, deltacome)
    fresh.load_delta(2, bitdelta)                                   # makes the sign buffers: the plan is stale
    fresh.write_planned(plan)                                       # written, into a slot nothing reads yet
    before = _bank_state(fresh)
    assert not fresh.runner.bank.commit_plan(plan)
    _assert_same_state(_bank_state(fresh), before)
    fresh.load_planned(1, deltacome, plan)                          # falls back to a full load
    reference = make_engine(dataclasses.replace(tenants, deltas=[deltacome]), max_slots=3)
    reference.load_delta(2, bitdelta)
    reference.load_delta(1, deltacome)
    _assert_same_state(_bank_state(fresh), _bank_state(reference))


def test_a_plan_refused_at_commit_leaves_its_slot_empty(tenants):
    """Written copies whose delta fails the check at commit do not stay half-counted: the slot is left cleared, as
    after a load and a clear, and the error is raised. (A resident delta of another group size over the same
    number of scale groups changes no buffer, only the bank's group size, which is set here directly.)"""
    deltacome = tenants.deltas[0]
    engine = make_engine(dataclasses.replace(tenants, deltas=[deltacome]), max_slots=3)
    plan = engine.plan_load(1, deltacome)
    engine.write_planned(plan)
    generation = engine.runner.bank.generation[1]
    engine.runner.bank.group_size = deltacome.group_size * 2
    with pytest.raises(ValueError, match="group_size"):
        engine.runner.bank.commit_plan(plan)
    engine.runner.bank.group_size = deltacome.group_size
    assert engine.runner.bank.generation[1] > generation        # K/V cached under the slot expired
    reference = make_engine(dataclasses.replace(tenants, deltas=[deltacome]), max_slots=3)
    reference.load_delta(1, deltacome)
    reference.clear_slot(1)
    _assert_same_state(_bank_state(engine)[:-1], _bank_state(reference)[:-1])    # all but the generations


def test_async_engine_loads_deltas_between_steps(tenants, solo):
    """Loads posted while a request decodes run on the step thread between steps: the caller gets the load's
    error, the running request's tokens are unchanged, and the newly loaded slot serves its tenant."""
    async def main():
        engine = AsyncEngine(EngineConfig(str(tenants.base), max_slots=3, num_kv_blocks=64, block_size=4))
        engine.load_delta(0, tenants.deltas[0])          # not started: runs on this thread
        await engine.start()
        decoding = asyncio.Event()

        async def tokens(rid, prompt, slot):
            out = []
            async for o in engine.generate(rid, list(PROMPTS[prompt]), greedy(), slot):
                out += o.new_token_ids
                decoding.set()
            return out

        running = asyncio.create_task(tokens("a", 0, 0))
        await decoding.wait()
        await asyncio.to_thread(engine.load_delta, 1, tenants.deltas[1])
        foreign = dataclasses.replace(tenants.deltas[2],
                                      metadata={**tenants.deltas[2].metadata, "base_fingerprint": "x"})
        with pytest.raises(ValueError, match="made for base"):
            await asyncio.to_thread(engine.load_delta, 2, foreign)
        await asyncio.to_thread(engine.clear_slot, 2)
        loaded = await tokens("b", 1, 1)
        first = await running
        await engine.stop()
        return first, loaded

    first, loaded = asyncio.run(main())
    assert first == solo[0, 0] and loaded == solo[1, 1]


def test_prefix_cache_is_shared_within_a_tenant_only(tenants, solo):
    engine = make_engine(tenants)
    blocks = engine.blocks
    engine.add_request("first", list(PROMPTS[1]), greedy(), 0)
    assert run_to_end(engine)["first"] == solo[1, 0] and blocks.num_cached_tokens == 0
    # Same tenant, same prompt: its two full blocks (of 4 tokens) come from the cache, tokens unchanged.
    engine.add_request("again", list(PROMPTS[1]), greedy(), 0)
    assert run_to_end(engine)["again"] == solo[1, 0] and blocks.num_cached_tokens == 8
    # Another tenant (or the base) never reads tenant 0's K/V.
    engine.add_request("other", list(PROMPTS[1]), greedy(), 1)
    engine.add_request("base", list(PROMPTS[1]), greedy(), -1)
    out = run_to_end(engine)
    assert out["other"] == solo[1, 1] and out["base"] == solo[1, -1] and blocks.num_cached_tokens == 8
    # Reloading the slot (a new tenant, or a new version) expires what was cached under it.
    engine.load_delta(0, tenants.deltas[0])
    engine.add_request("reloaded", list(PROMPTS[1]), greedy(), 0)
    assert run_to_end(engine)["reloaded"] == solo[1, 0] and blocks.num_cached_tokens == 8
    assert engine.stats().kv_blocks_used == 0
