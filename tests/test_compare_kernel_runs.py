"""bench/compare_kernel_runs.py on two made-up kernel_bench runs: matching cases, speedups, layer line, GPU check."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_kernel_runs as ckr  # noqa: E402


def _run(us: dict, layer_us: float, device: str = "H100") -> dict:
    decode = [dict(shape=s, batch=b, tenants=t, kernel_us=v, frac_copy_bw=1.0 / v, sign_us=3 * v,
                   sign_frac_copy_bw=0.5 / v) for (s, b, t), v in us.items()]
    layer = dict(batch=64, tenants=32, layer_graph_us=layer_us, floor_us=400.0, graph_ratio_to_floor=layer_us / 400)
    return dict(device=device, copy_bw_gbs=3000.0, decode=decode, layer=layer)


def test_speedups_are_before_over_after_on_shared_cases(tmp_path):
    before = _run({("qkv", 1, 1): 40.0, ("o", 64, 32): 100.0, ("down", 1, 1): 10.0}, 2000.0)
    after = _run({("qkv", 1, 1): 20.0, ("o", 64, 32): 125.0}, 1600.0)  # down missing from after: left out
    res = ckr.compare(before, after)
    assert [(r["shape"], r["speedup"]) for r in res["rows"]] == [("qkv", 2.0), ("o", 0.8)]
    assert res["geomean"] == pytest.approx((2.0 * 0.8) ** 0.5) and (res["min"], res["max"]) == (0.8, 2.0)
    text = ckr.markdown(res, "a change", "cmd")
    assert "| qkv | 1 | 1 | 40.0 | 20.0 | 2.000 | 2.5% | 5.0% |" in text
    assert "2000 -> 1600 us (1.250x; 4.00x the bandwidth floor of 400 us after, 5.00x before)" in text


def test_sign_kernel_times_compare_on_request():
    before = _run({("qkv", 1, 1): 40.0}, 2000.0)
    after = _run({("qkv", 1, 1): 20.0}, 1600.0)
    (row,) = ckr.compare(before, after, "sign")["rows"]
    assert (row["before_us"], row["after_us"], row["speedup"], row["after_bw"]) == (120.0, 60.0, 2.0, 0.025)


def test_runs_of_different_gpus_are_refused():
    with pytest.raises(SystemExit, match="different GPUs"):
        ckr.compare(_run({("qkv", 1, 1): 1.0}, 1.0, "H100"), _run({("qkv", 1, 1): 1.0}, 1.0, "H200"))
