"""Baseline systems of bench/serve.py that need their own engine: BitDelta through its Triton sign kernel, and
the engine's PyTorch delta path (dequantize, then matmul, per tenant). bench is serve.Bench."""
from __future__ import annotations

import time

from random_models import random_sign_delta
from serve_bench_engine import fill_slots, mix, pinned, step_time, stored_bytes
from serve_bench_output import BITDELTA, TORCH


def skipped(bench, system: str, batch: int, tenants: int, why: str, kind: str = "skipped") -> None:
    r = {"system": system, "batch": batch, "tenants": tenants, "kind": kind, "tok_s": None, "note": why}
    bench.res["rows"].append(r)
    print(r, flush=True)


def bitdelta_phase(bench, plan: dict) -> None:
    """One random BitDelta file (signs + one scale per matrix, 1 bit/param) in every slot; every point."""
    a = bench.args
    max_t = max(a.tenants)
    delta = pinned(random_sign_delta(plan["shapes"], plan["fingerprint"], seed=3, embeddings=a.with_embeddings),
                   bench.device)
    size = stored_bytes(delta)
    bench.res["delta_bytes"]["bitdelta"] = size
    bench.res["delta_bits_per_param"]["bitdelta"] = 8 * size / plan["matrix_params"]
    engine = bench.engine(max_t, slot_bits_per_param=1.0)
    bench.log(f"bitdelta engine: filled {max_t} slots in {fill_slots(engine, delta, max_t):.1f} s")
    for b, t in bench.points:
        if bench.over_budget():
            skipped(bench, BITDELTA, b, t, "skipped: past the run's time budget")
            continue
        bench.row(engine, BITDELTA, b, t, step_time(engine, mix(b, t), a.warmup, a.steps, a.prompt_len), size)


def torch_phase(bench, plan: dict) -> None:
    """The PyTorch delta path, eager (no CUDA graphs: its per-tenant loop reads host-side slot lists), at the
    --torch-tenants points in order of cost, each skipped when its predicted time would pass the budget."""
    a = bench.args
    delta = plan["deltas"][1.0]
    size = stored_bytes(delta)
    points = sorted([p for p in bench.points if p[1] in a.torch_tenants], key=lambda p: (p[1], p[0]))
    for b, t in bench.points:
        if t not in a.torch_tenants:
            skipped(bench, TORCH, b, t, f"not run: the PyTorch path runs tenants {a.torch_tenants} (--torch-tenants)",
                    "not run")
    if not points:
        return
    slots = max(t for _, t in points)
    engine = bench.engine(slots, slot_bits_per_param=1.0, delta_kernels=False, cuda_graphs=False)
    fill_slots(engine, delta, slots)
    step_time(engine, [0], 0, 1, a.prompt_len)          # first-call costs (cuBLAS handles) off the clock
    start, per_tenant_step = time.perf_counter(), 0.0
    budget = min(a.torch_budget, a.time_budget - bench.elapsed())
    for b, t in points:
        chunks = -(-b * a.prompt_len // engine.config.max_num_batched_tokens)
        predicted = per_tenant_step * t * (chunks + 1 + a.torch_steps)
        if time.perf_counter() - start + predicted > budget:
            skipped(bench, TORCH, b, t, f"skipped: ~{predicted:.0f} s predicted, past its {budget:.0f} s budget")
            continue
        step_s = step_time(engine, mix(b, t), 1, a.torch_steps, a.prompt_len)
        bench.row(engine, TORCH, b, t, step_s, size, warmup=1, steps=a.torch_steps)
        per_tenant_step = max(per_tenant_step, step_s / t)
