"""The serving benchmark's request schedule (Poisson arrivals, Zipf tenants) and its percentile summary."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from load_schedule import make_schedule, percentiles, zipf_weights  # noqa: E402


def test_poisson_arrivals_have_the_asked_rate_and_stop_at_the_duration():
    schedule = make_schedule(20_000, rate=5.0, num_tenants=10, zipf_s=1.0, duration_s=1e9, seed=1)
    times = np.array([a.at for a in schedule])
    gaps = np.diff(times)
    assert (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() == pytest.approx(0.2, rel=0.05)  # exponential: std = mean
    cut = make_schedule(20_000, rate=5.0, num_tenants=10, zipf_s=1.0, duration_s=100.0, seed=1)
    assert cut[-1].at <= 100.0 and len(cut) == pytest.approx(500, rel=0.15)


def test_tenants_follow_zipf_popularity():
    w = zipf_weights(4, 1.0)
    assert w == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    assert zipf_weights(5, 0.0) == pytest.approx(np.full(5, 0.2))
    schedule = make_schedule(50_000, rate=1.0, num_tenants=100, zipf_s=1.2, duration_s=1e9, seed=2)
    counts = np.bincount([a.tenant for a in schedule], minlength=100) / len(schedule)
    assert counts[:3] == pytest.approx(zipf_weights(100, 1.2)[:3], rel=0.05)


def test_percentiles():
    s = percentiles([float(v) for v in range(1, 101)])
    assert (s["p50"], s["p90"], s["p99"], s["mean"], s["n"]) == pytest.approx((50.5, 90.1, 99.01, 50.5, 100))
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
