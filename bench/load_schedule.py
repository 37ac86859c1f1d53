"""Open-loop request schedule for serving benchmarks, and the percentile summary of its measurements.

Arrivals are Poisson (exponential gaps at ``rate`` requests/s), so the load does not slow down when the
server does (a closed loop would hide queueing). Tenants are drawn Zipf(s) by popularity rank: tenant 0
is the most popular, and with s ~ 1 a long tail of tenants is asked rarely, which is what drives them
through the host and disk tiers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float     # seconds after the run starts
    tenant: int   # popularity rank, 0 = most popular


def zipf_weights(num_tenants: int, s: float) -> np.ndarray:
    """P(rank k) proportional to 1 / (k + 1)^s over a finite set (s = 0: uniform)."""
    w = 1.0 / np.arange(1, num_tenants + 1, dtype=np.float64) ** s
    return w / w.sum()


def make_schedule(num_requests: int, rate: float, num_tenants: int, zipf_s: float, duration_s: float,
                  seed: int) -> list[Arrival]:
    """At most ``num_requests`` arrivals, none later than ``duration_s``."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    tenants = rng.choice(num_tenants, size=num_requests, p=zipf_weights(num_tenants, zipf_s))
    return [Arrival(float(t), int(k)) for t, k in zip(times, tenants) if t <= duration_s]


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": ..., "mean": ..., "n": ...} in the values' unit; None when there are no values."""
    out: dict[str, float | None] = {f"p{q}": None for q in qs} | {"mean": None}
    if values:
        arr = np.asarray(values, dtype=np.float64)
        out |= {f"p{q}": float(np.percentile(arr, q)) for q in qs} | {"mean": float(arr.mean())}
    return out | {"n": len(values)}

