"""Merged-model swapping for bench/serve.py: what users do without deltaserve.

Each tenant is one merged FP16 model; one fits on the GPU at a time. Serving T tenants' rows round-robin:
copy tenant t's weights host -> device (pinned, non_blocking, then synchronize), decode its rows for k steps
(k tokens per residency), then the next tenant. tokens/s = batch * k / (copies + decode steps of the round).
Prefills are left out of the clock, as for every system of the benchmark.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from deltaserve.engine import LLMEngine
from serve_bench_engine import step_time, sync

SYSTEM = "merged-model swapping"


class MergedSwapper:
    """One page-locked host copy of every backbone parameter: it stands in for every tenant's merged model (the
    copy time does not depend on the values). swap_in() writes it into the engine's parameters in place, so the
    engine's captured CUDA graphs stay valid."""

    def __init__(self, engine: LLMEngine):
        self.device = engine.runner.device
        self.params = list(engine.runner.model.parameters())
        pin = self.device.type == "cuda"
        self.host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p.detach()) for p in self.params]
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)
        self.swap_seconds: list[float] = []

    @torch.no_grad()
    def swap_in(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for p, h in zip(self.params, self.host):
            p.copy_(h, non_blocking=True)
        sync(self.device)
        seconds = time.perf_counter() - t0
        self.swap_seconds.append(seconds)
        return seconds


def rows_per_tenant(batch: int, tenants: int) -> list[int]:
    """Rows of each tenant when row i of the batch belongs to tenant i % tenants."""
    return [len(range(t, batch, tenants)) for t in range(tenants)]


def merged_rows(engine: LLMEngine, swapper: MergedSwapper, points: list[tuple[int, int]], k: int, direct_max: int,
                base_step: Callable[[int], float], prompt_len: int, late: Callable[[], bool]) -> list[dict]:
    """One row per (batch, tenants): measured by running whole rounds for tenants <= direct_max, derived from
    the measured swap time and base step times above that (a round of 32+ swaps costs minutes), and equal to
    the backbone (no swap ever) for one tenant. base_step(n): seconds per decode step of n base rows, warm.
    Once late() is true, the remaining points are marked skipped."""
    rows = []
    for batch, tenants in points:
        per = rows_per_tenant(batch, tenants)
        row = {"system": SYSTEM, "batch": batch, "tenants": tenants, "tokens_per_residency": k}
        if late():
            rows.append(row | {"kind": "skipped", "tok_s": None, "note": "skipped: past the run's time budget"})
            continue
        if tenants == 1:
            round_s = k * base_step(batch)
            row |= {"kind": "resident", "note": "one tenant stays resident: no swaps, the backbone's rate"}
        elif tenants <= direct_max:
            for n in set(per):
                base_step(n)                         # CUDA graph of this batch size captured before the clock
            round_s = 0.0
            for n in per:
                round_s += swapper.swap_in()
                round_s += k * step_time(engine, [-1] * n, 0, k, prompt_len)
            row |= {"kind": "measured"}
        else:
            while len(swapper.swap_seconds) < 2:
                swapper.swap_in()
            swap = statistics.median(swapper.swap_seconds)
            round_s = sum(swap + k * base_step(n) for n in per)
            row |= {"kind": "derived", "swap_s": round(swap, 4),
                    "note": "derived: tenants x (median measured swap + k x measured step time of its rows)"}
        row |= {"round_s": round(round_s, 4), "tok_s": round(batch * k / round_s, 2)}
        rows.append(row)
        print(row, flush=True)
    return rows
