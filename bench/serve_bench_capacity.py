"""Capacity for bench/serve.py: how many tenants' deltas fit on the device next to the backbone and a KV cache
reserved for `seqs` sequences x `seq_len` tokens. The count is planned from the free memory measured after a
backbone was loaded, then proven: an engine with that many slots is built, every slot is filled, and one
decode step runs with rows on the first, middle and last slots. An out-of-memory error retries one slot lower.
"""
from __future__ import annotations

import time

import torch

from deltaserve.delta_store.format import DeltaFile
from serve_bench_engine import build_engine, fill_slots, free_bytes, free_device, step_time, stored_bytes


def planned_slots(free_now: int, kv_now: int, kv_need: int, slot_bytes: int, headroom: int) -> int:
    """Slots that fit when the KV cache of `kv_now` bytes (already allocated, counted out of free_now) becomes
    one of `kv_need` bytes, keeping `headroom` bytes for activations, logits, CUDA graphs and the allocator."""
    return max(0, int((free_now + kv_now - kv_need - headroom) // slot_bytes))


def measure_capacity(model: str, device: str, dtype: str, delta: DeltaFile, slot_bits: float, count: int,
                     seqs: int, seq_len: int, block_size: int = 16, retries: int = 2) -> dict:
    """Build an engine of `count` slots and KV for seqs x seq_len tokens, fill every slot with `delta`, run one
    decode step; returns what was measured (count lowered by one per out-of-memory error)."""
    notes = []
    for _ in range(retries + 1):
        if count < 1:
            break
        engine = None
        try:
            t0 = time.perf_counter()
            engine = build_engine(model, device, dtype, max_slots=count, slot_bits_per_param=slot_bits,
                                  num_kv_blocks=seqs * -(-seq_len // block_size), block_size=block_size,
                                  max_num_seqs=seqs, max_model_len=seq_len)
            build_s = time.perf_counter() - t0
            fill_s = fill_slots(engine, delta, count)
            probe = sorted({0, count // 2, count - 1})
            step_s = step_time(engine, probe, 1, 1, 16)
            stats = engine.stats()
            dev = engine.runner.device
            return {"slots": count, "ok": True, "backbone_bytes": stats.backbone_bytes,
                    "delta_bytes_all_slots": stats.delta_slot_bytes, "slot_bytes": stats.delta_slot_bytes // count,
                    "kv_bytes": stats.kv_cache_bytes, "kv_tokens": stats.kv_blocks_total * block_size,
                    "free_after_bytes": free_bytes(dev) if dev.type == "cuda" else None,
                    "probe_slots": probe, "probe_step_ms": round(step_s * 1e3, 2), "build_s": round(build_s, 1),
                    "fill_s": round(fill_s, 1), "notes": notes}
        except torch.cuda.OutOfMemoryError as exc:
            notes.append(f"{count} slots: out of memory ({str(exc).splitlines()[0][:120]})")
            print(notes[-1], flush=True)
            count -= 1
        finally:
            del engine
            free_device()
    return {"slots": 0, "ok": False, "notes": notes}


def capacity_phase(bench, plan: dict) -> None:
    """Plan and prove the capacity at each --capacity-bits; bench is serve.Bench, plan from its deltaserve phase
    (free memory measured after the backbone loaded, that engine's KV bytes, the deltas)."""
    a = bench.args
    kv_need = (a.capacity_seqs * -(-a.capacity_len // 16) + 1) * plan["block_bytes"]
    if plan["free_after_backbone"] is not None:
        free_now = plan["free_after_backbone"] - plan.get("leftover", 0)
    else:       # CPU: pretend the device has --cpu-memory bytes
        free_now = a.cpu_memory - plan["backbone_bytes"] - plan["kv_now"]
    for bits in a.capacity_bits:
        if bench.over_budget():
            bench.res["capacity"].append({"bits_per_param": bits, "slots": 0, "skipped": "time budget"})
            continue
        delta = plan["deltas"][bits]
        slot = stored_bytes(delta)
        dbits = 8 * slot / plan["matrix_params"]
        count = planned_slots(free_now, plan["kv_now"], kv_need, slot, a.headroom)
        arithmetic = (f"({free_now / 1e9:.2f} GB free after the backbone + {plan['kv_now'] / 1e9:.2f} GB of that "
                      f"engine's KV - {kv_need / 1e9:.2f} GB KV - {a.headroom / 1e9:.2f} GB headroom) / "
                      f"{slot / 1e9:.3f} GB per slot")
        if a.capacity_max:
            count = min(count, a.capacity_max)
        bench.log(f"capacity at {bits} bit/param: {count} slots planned = {arithmetic}")
        cap = {"bits_per_param": bits, "delta_bits_per_param": dbits, "planned_slots": count, "arithmetic": arithmetic,
               "kv_reserved": f"{a.capacity_seqs} x {a.capacity_len} tokens", "kv_reserved_bytes": kv_need,
               "headroom_bytes": a.headroom}
        # A slot is sized by its nominal bits/param; a tiny model's delta can exceed 0.5 (fixed 2@8 + 32@3 tiers).
        cap |= measure_capacity(bench.path, a.device, bench.dtype, delta, max(bits, dbits * 1.001), count,
                                a.capacity_seqs, a.capacity_len)
        bench.res["capacity"].append(cap)
        bench.log(f"capacity at {bits} bit/param: {cap['slots']} slots resident and decoding")
        bench.save()
