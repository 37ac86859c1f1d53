"""bench/tune_kernels.py's logic on CPU with fake kernels and timings: which keys get tuned, which candidates are
refused, what the table and the report hold (the timing itself needs a GPU)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_kernels as tk  # noqa: E402
from deltaserve.kernels.bitplanes import UNPACK_NAMES  # noqa: E402
from deltaserve.kernels.tuning import LaunchConfig, default_config, table_key, write_config_table  # noqa: E402

PLANES, PAIRS = UNPACK_NAMES.index("planes"), UNPACK_NAMES.index("pairs")
SHAPES = {"qkv": {"shrink": (4096, 907), "expand": (4096,), "sign": (4096, 4096)},
          "o": {"shrink": (4096, 907), "expand": (4096,), "sign": (4096, 4096)},
          "down": {"shrink": (11008, 1348), "expand": (4096,), "sign": (11008, 4096)}}


def _tiles(cases):
    return {case: tk.case_tiles(case, 64, "cpu") for case in cases}


def test_cases_cover_decode_and_long_segments():
    cases = tk.tuning_cases((1, 16, 64), (1, 4, 32))
    assert all(c.tenants <= c.rows for c in cases)
    assert tk.Case(1, 4) not in cases and tk.Case(64, 32) in cases
    tiles = _tiles(cases)
    heights = {t[0] for per_kernel in tiles.values() for t in per_kernel.values() if t is not None}
    assert heights == {16, 32, 64}  # prefill-like cases: 32- and 64-row tiles
    # One row a tenant: the decode kernels take every tile, so there is no tl.dot launch to time. Two and four rows a
    # tenant (64 over 32, 16 over 4): the decode variants take them too (in the interpreter from 2 tiles:
    # tuning.decode_rows); five and more go to tl.dot.
    for case in (tk.Case(1, 1), tk.Case(64, 32), tk.Case(16, 4)):
        assert set(tiles[case].values()) == {None}, case
    assert set(tk.case_tiles(tk.Case(20, 4), 64, "cpu").values()) == {(16, 4)}
    assert tk.Case(512, 16).row_slots()[:18] == list(range(16)) + [0, 1]
    assert set(tk.case_tiles(tk.Case(512, 16), 64, "cpu").values()) == {(32, 16)}
    assert set(tk.case_tiles(tk.Case(512, 1), 64, "cpu").values()) == {(64, 8)}


def test_each_key_is_tuned_once_on_the_first_case_reaching_it():
    cases = tk.tuning_cases((1, 16, 64), (1, 4, 16))
    jobs = tk.plan_jobs(SHAPES, cases, _tiles(cases))
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    assert not any(j.shape == "o" for j in jobs)  # o's keys are all qkv's
    assert not any(j.shape == "down" and j.kernel == "expand" for j in jobs)
    # batch 16 over 1 tenant is the first case with one 16-row tile (batch 1 takes the decode kernels)
    first = {j.key: j.case for j in jobs}
    assert first[table_key("shrink", (4096, 907), 128, 1, 16)] == tk.Case(16, 1)
    assert tk.Case(1, 1) not in first.values() and tk.Case(16, 16) not in first.values()
    assert table_key("sign", (4096, 4096), None, 1, 64) in first
    assert all(" g=0 " in k for k in keys if k.startswith("sign"))


def _fake_call(times_us: dict[LaunchConfig, float], broken: dict[LaunchConfig, Exception | torch.Tensor]):
    """A kernel whose output is right, except for `broken` configs (an exception raised or a wrong tensor), and
    whose launch returns its time in ms (the test's timer calls it)."""
    want = torch.arange(1.0, 7.0)

    def result(c):
        bad = broken.get(c)
        if isinstance(bad, Exception):
            raise bad
        return want.clone() if bad is None else bad

    return tk.KernelCall(result, lambda c: times_us.get(c, 50.0) / 1e3, lambda: want)


def _timer(fn):
    return fn()


def test_refused_candidates_are_skipped_with_the_reason():
    base = default_config("expand", 4)
    fast_wrong = LaunchConfig((32, 64, 4), PAIRS)
    no_compile = LaunchConfig((64, 128, 4), PAIRS, 8)
    nan = LaunchConfig((16, 64, 8), PAIRS, 4, 4)
    wide = LaunchConfig((32, 256, 4))  # BLOCK_N 256 spans two groups of 128
    call = _fake_call({fast_wrong: 1.0, no_compile: 1.0, nan: 1.0, base: 20.0},
                      {fast_wrong: torch.arange(1.0, 7.0) * 1.05, no_compile: RuntimeError("PassManager::run failed"),
                       nan: torch.full((6,), float("nan"))})
    want = call.reference()
    out = {c: tk.measure("expand", call, want, c, _timer) for c in (base, fast_wrong, no_compile, nan, wide)}
    assert out[base].us == 20.0 and out[base].skipped is None
    assert out[fast_wrong].skipped.startswith("wrong result")
    assert out[no_compile].skipped.startswith("does not compile: PassManager::run failed")
    assert out[nan].skipped.startswith("wrong result")
    assert "does not divide the group size" in out[wide].skipped
    assert all(out[c].us is None for c in (fast_wrong, no_compile, nan, wide))


def _tuned(job, times_us, broken=None):
    return tk.tune_job(job, _fake_call(times_us, broken or {}), _timer)


def test_table_and_report_hold_the_fastest_right_candidate(tmp_path):
    shrink = tk.Job(table_key("shrink", (4096, 907), 128, 1, 16), "shrink", "qkv", tk.Case(1, 1), 1)
    sign = tk.Job(table_key("sign", (4096, 4096), None, 4, 64), "sign", "qkv", tk.Case(256, 1), 4)
    late = tk.Job(table_key("sign", (4096, 4096), None, 8, 64), "sign", "qkv", tk.Case(512, 1), 8)
    pairs_best = LaunchConfig((16, 64, 8), PAIRS, 4, 4)
    wrong_fastest = LaunchConfig((16, 128, 8), PAIRS)
    results = [_tuned(shrink, {pairs_best: 5.0, wrong_fastest: 1.0, default_config("shrink", 1): 10.0},
                      {wrong_fastest: torch.zeros(6)}),
               _tuned(sign, {default_config("sign", 4): 3.0}),
               tk.KeyResult(late, default_config("sign", 8))]  # past the time budget
    table = tk.best_table(results)
    assert table == {shrink.key: pairs_best, sign.key: default_config("sign", 4)}
    row = tk.report_row(results[0])
    assert row["best_us"] == 5.0 and row["default_us"] == 10.0 and row["speedup"] == 2.0
    assert row["best_us_by_unpack"] == {"planes": 10.0, "pairs": 5.0}
    assert [s["why"][:5] for s in row["skipped"]] == ["wrong"]

    header = dict(device="Fake GPU", torch="2", triton="3", date="today", command="tune_kernels.py", copy_bw_gbs=3000.0)
    tk.write_report(results, header, tmp_path)
    report = json.loads((tmp_path / "kernel_tuning.json").read_text())
    assert report["device"] == "Fake GPU" and [r["tuned"] for r in report["keys"]] == [True, True, False]
    md = (tmp_path / "kernel_tuning.md").read_text()
    assert "Fake GPU" in md and "3000 GB/s" in md and "not tuned (time budget)" in md
    assert "16x64/8 pairs w4 s4" in md and "## Skipped candidates" in md

    # the written table reads back as the same configs
    path = tmp_path / "gpu.json"
    write_config_table(path, table, {k: header[k] for k in ("device", "date")})
    entries = json.loads(path.read_text())["configs"]
    assert {k: LaunchConfig.from_json(k.split(" ")[0], e) for k, e in entries.items()} == table


def test_the_default_is_timed_even_when_no_candidate_equals_it():
    for kernel in tk.KERNELS:
        for work in (1, 2, 4, 8, 16, 32, 64):
            configs = tk.configs_to_time(kernel, work)
            assert default_config(kernel, work) in configs and len(configs) == len(set(configs))


def test_past_the_time_budget_keys_are_listed_untuned():
    cases = tk.tuning_cases((1, 16), (1, 4))
    jobs = tk.plan_jobs(SHAPES, cases, _tiles(cases))
    results = tk.tune_all(jobs, {}, 64, budget_s=-1.0, g=None)  # no kernel is built or run
    assert [r.job for r in results] == jobs and not any(r.outcomes for r in results)
    assert tk.best_table(results) == {}
