"""bench/tune_decode.py's ranking on CPU with made-up timings: a candidate counts only if it ran correctly on every
shape, the fastest over the shapes' sum wins, and the report names the ones never ranked (timing needs a GPU)."""
import argparse
import json
import sys
from pathlib import Path

import pytest

from deltaserve.kernels.tuning import LaunchConfig, table_key, write_config_table, write_decode_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_decode as td  # noqa: E402


def _row(shape: str, config: str, us: float, ok: bool = True) -> dict:
    return dict(shape=shape, batch=64, tenants=32, kernel="shrink", work=32, rows=2, config=config,
                params={"SPLIT_K": 4} if config == "default" else {"SPLIT_K": 8}, us=us, ok=ok)


def test_fastest_correct_candidate_over_the_shapes_wins(tmp_path):
    rows = [_row("qkv", "default", 10.0), _row("o", "default", 10.0),
            _row("qkv", "a", 4.0), _row("o", "a", 9.0),        # 13 in all: the fastest correct one
            _row("qkv", "b", 3.0), _row("o", "b", 3.0, False),  # fastest, but wrong on o: never ranked
            _row("qkv", "c", 8.0), _row("o", "c", 4.0)]         # 12 in all, but o's own best only
    (summary,) = td.summarize(rows, ["qkv", "o"])
    assert summary["best"] == "c" and summary["best_us"] == 12.0 and summary["default_us"] == 20.0
    assert summary["per_shape_best"] == {"qkv": "b", "o": "c"}  # each shape's own, b correct on qkv
    assert summary["wrong"] == ["b"] and abs(summary["speedup"] - 20 / 12) < 1e-9
    res = dict(device="cpu", torch="-", triton="-", seconds=0.0, shapes=["qkv", "o"], summary=[summary])
    td.write_markdown(res, tmp_path / "decode_tuning.md")
    text = (tmp_path / "decode_tuning.md").read_text()
    assert "| shrink | 64 | 32 | 32 | 2 | SPLIT_K=4 | 20.0 | c | 12.0 | 1.67 |" in text
    assert "(never ranked): b." in text


def test_table_holds_each_keys_fastest_and_keeps_the_launch_configs(tmp_path):
    """The decode table written from a run: one entry per (kernel, work, rows a tile), the fastest candidate's
    meta-parameters, in the GPU's table next to bench/tune_kernels.py's launch configs."""
    rows = [_row("qkv", "default", 10.0), _row("qkv", "a", 4.0)]
    rows[1]["params"] = {"SPLIT_K": 16, "BLOCK_R": 64, "num_warps": 2}
    entries = td.table_entries(td.summarize(rows, ["qkv"]))
    assert entries == {"shrink g=128 w=32 r=2": {"SPLIT_K": 16, "BLOCK_R": 64, "num_warps": 2}}
    path = tmp_path / "gpu.json"
    write_config_table(path, {table_key("expand", (4096,), 128, 1, 16): LaunchConfig((32, 128, 4))}, {"device": "x"})
    write_decode_table(path, entries, {"device": "x"})
    body = json.loads(path.read_text())
    assert body["decode_configs"] == entries and list(body["configs"]) == ["expand d=4096 g=128 w=1 m=16"]


def test_a_run_of_some_cases_replaces_only_their_keys(tmp_path):
    """--cases: the keys the run reached take its picks, the table's other keys and launch configs stay, and the
    about names the run the other keys came from."""
    path = tmp_path / "gpu.json"
    first = {"shrink g=128 w=32 r=2": {"SPLIT_K": 8}, "shrink g=128 w=16 r=4": {"SPLIT_K": 4}}
    path.write_text(json.dumps({"configs": {"k": {}}, "decode_about": {"command": "all"}, "decode_configs": first}))
    write_decode_table(path, {"shrink g=128 w=16 r=4": {"SPLIT_K": 16}}, {"command": "some"}, keep_others=True)
    body = json.loads(path.read_text())
    assert body["decode_configs"] == {"shrink g=128 w=16 r=4": {"SPLIT_K": 16}, "shrink g=128 w=32 r=2": {"SPLIT_K": 8}}
    assert body["decode_about"] == {"command": "some", "other_keys_from": "all"} and body["configs"] == {"k": {}}
    write_decode_table(path, {"sign g=0 w=1 r=1": {"SPLIT_K": 2}}, {"command": "all again"})  # a whole run
    assert json.loads(path.read_text())["decode_configs"] == {"sign g=0 w=1 r=1": {"SPLIT_K": 2}}


def test_cases_parse_as_batch_by_tenants():
    assert td.parse_cases("16x4,64X16") == ((16, 4), (64, 16))
    for bad in ("16", "16x", "4x16", "128x65", "16x0"):
        with pytest.raises(argparse.ArgumentTypeError):
            td.parse_cases(bad)


def test_a_key_with_no_correct_candidate_is_left_out():
    """Every candidate wrong on some shape: the key gets no summary row and no table entry (the run goes on)."""
    rows = [_row("qkv", "default", 10.0), _row("o", "default", 10.0), _row("qkv", "a", 4.0, False), _row("o", "a", 4.0)]
    assert td.summarize(rows, ["qkv", "o"]) == [] and td.table_entries([]) == {}
