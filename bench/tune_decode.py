"""Time the decode (bit-serial) kernels' meta-parameters on the GPU: splits and program sizes of the shrink, expand
and sign (BitDelta) decode kernels, per row-tile count and rows a tile, summed over a Llama-2-7B layer's four
shapes.

tuning.decode_config picks these from the work bucket (row tiles of a launch) and the rows a tile: built-in
defaults from this script's H100 runs, or this GPU's table entry (the "default" below). Each candidate runs through
tuning.forced_decode_config, the kernel alone (kernel_bench.ms: CUDA graph replay, L2 flushed), on batches whose
row i belongs to tenant i % tenants, so a case's tiles all have batch / tenants rows. A candidate whose output
differs from the default config's is reported and never ranked.

Usage (GPU, ~3 min on an H100; ~30 s a case with --cases):
    python bench/tune_decode.py [--shapes qkv,o] [--cases 16x4,64x16] [--out DIR] [--table PATH | --no-table]
writes DIR/decode_tuning.json and .md (default bench/results): per (kernel, work bucket, rows a tile) the
time of the config in use and the fastest candidate's, summed over the shapes, and each shape's own best; and the
fastest per key into the GPU's config table (kernels/configs/<GPU name>.json, its "decode_configs"; the launch
configs bench/tune_kernels.py wrote stay), which tuning.decode_config then reads. Keys the cases do not reach
keep the built-in defaults (tuning._default_decode_config, measured on the H100). --cases (batch x tenants)
times only those and replaces only the table's keys they reach, keeping the others: a re-tune of some keys
within one device call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from deltaserve.kernels import SlotMetadata
from deltaserve.kernels.lowrank_expand import expand_triton
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_shrink import shrink_triton
from deltaserve.kernels.sign_delta import add_sign_delta_triton
from deltaserve.kernels.tuning import (CONFIG_DIR, decode_config, decode_table_key, device_slug, forced_decode_config,
                                       work_bucket, write_decode_table)
from kernel_bench import Weights, make_weights, ms, rel_err, shape_bench_args
from random_models import G

# (batch, tenants): one-row tiles at every work bucket, then two- and four-row tiles.
CASES = ((1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64), (16, 8), (64, 32), (16, 4), (64, 16))
CANDIDATES = {
    "shrink": [dict(SPLIT_K=s, BLOCK_R=r, num_warps=w) for s in (2, 4, 8, 16, 32, 64)
               for r, w in ((128, 4), (64, 2), (32, 1))]
    + [dict(SPLIT_K=s, BLOCK_R=64, num_warps=2, SHARE_ROWS=1, **cap) for s in (4, 8, 16, 32)
       for cap in ({}, {"maxnreg": 128})]  # a tile's rows in one pass (kernels/lowrank_shrink.py)
    + [dict(SPLIT_K=s, BLOCK_R=32, num_warps=1, SHARE_ROWS=1) for s in (4, 8, 16, 32)],
    "expand": [dict(SPLIT_R=s, BLOCK_N=n, num_warps=w) for s in (8, 16, 32, 64, 128, 256)
               for n, w in ((4096, 4), (2048, 2))],
    "sign": [dict(SPLIT_K=s, BLOCK_N=n, num_warps=w) for s in (2, 4, 8, 16, 32, 64) for n, w in ((64, 4), (32, 2))],
}
SLOTS = 64


def parse_cases(text: str) -> tuple[tuple[int, int], ...]:
    """'16x4,64x16' -> ((16, 4), (64, 16)): batch x tenants, at most one tenant a row."""
    cases = []
    for item in text.split(","):
        try:
            batch, tenants = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BATCHxTENANTS (for example 64x16)") from None
        if not 1 <= tenants <= min(batch, SLOTS):
            raise argparse.ArgumentTypeError(f"{item!r} needs 1 <= tenants <= min(batch, {SLOTS})")
        cases.append((batch, tenants))
    return tuple(cases)


def name(params: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def time_case(w: Weights, batch: int, tenants: int, g: torch.Generator) -> list[dict]:
    """Every candidate of each kernel whose decode variant this case launches: one row per (kernel, candidate)."""
    plan = lowrank_plan_for(w.lowrank)
    x = torch.randn(batch, w.d_in, device="cuda", dtype=torch.float16, generator=g)
    y = torch.randn(batch, sum(w.d_outs), device="cuda", dtype=torch.float16, generator=g)
    meta = SlotMetadata.build(torch.arange(batch, device="cuda", dtype=torch.int32) % tenants, SLOTS)
    z = shrink_triton(x, meta, plan, G)

    def delta_alone(add) -> torch.Tensor:  # what add(out) adds, rounded once to fp16 (y is added into while timing)
        out = torch.zeros_like(y)
        add(out)
        return out.float()

    adds = {"expand": lambda out: expand_triton(out, z, meta, plan, G),
            "sign": lambda out: add_sign_delta_triton(out, x, meta, w.signs)}
    runs = {"shrink": lambda: shrink_triton(x, meta, plan, G), **{k: partial(f, y) for k, f in adds.items()}}
    outputs = {"shrink": runs["shrink"], **{k: partial(delta_alone, f) for k, f in adds.items()}}
    rows_out = []
    for kernel, cands in CANDIDATES.items():
        decode, dot, rows = meta.tile_kinds(kernel)
        if not decode or dot:  # timed only where every tile takes the decode kernel
            continue
        work = work_bucket(meta.launch_tiles()[1].shape[0])
        want = outputs[kernel]()
        base = dict(shape=w.name, batch=batch, tenants=tenants, kernel=kernel, work=work, rows=rows)
        default = dict(base, config="default", params=decode_config(kernel, work, G, rows),
                       us=ms(runs[kernel], True) * 1e3, ok=True)
        mine = [default]
        for params in cands:
            row = dict(base, config=name(params), params=params, us=float("inf"), ok=False)
            try:
                with forced_decode_config(kernel, **params):
                    # Atomics add in another order: fp32 rounding in z, at most an fp16 ulp here and there in y.
                    row["ok"] = rel_err(outputs[kernel](), want) < (1e-4 if kernel == "shrink" else 2e-3)
                    row["us"] = ms(runs[kernel], True) * 1e3
            except (CompilationError, OutOfResources) as e:  # reported, never ranked
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            mine.append(row)
        best = min((r for r in mine[1:] if r["ok"]), key=lambda r: r["us"], default=dict(us=float("nan"), config="none"))
        print(f"{w.name:8s} B={batch:3d} T={tenants:2d} {kernel:6s} w={work:2d} rows={rows}: default "
              f"{default['us']:7.1f} us, best {best['us']:7.1f} ({best['config']})", flush=True)
        rows_out += mine
    return rows_out


def summarize(rows: list[dict], shapes: list[str]) -> list[dict]:
    """Per (kernel, work, rows a tile, batch, tenants): the default's and each candidate's time summed over the
    shapes (a layer), the fastest candidate correct on every shape, and each shape's own fastest."""
    out = []
    keys = sorted({(r["kernel"], r["work"], r["rows"], r["batch"], r["tenants"]) for r in rows})
    for kernel, work, n_rows, batch, tenants in keys:
        mine = [r for r in rows if (r["kernel"], r["work"], r["rows"], r["batch"], r["tenants"]) ==
                (kernel, work, n_rows, batch, tenants)]
        totals: dict[str, float] = {}
        for config in dict.fromkeys(r["config"] for r in mine):
            got = [r for r in mine if r["config"] == config]
            if len(got) == len(shapes) and all(r["ok"] for r in got):
                totals[config] = sum(r["us"] for r in got)
        ranked = [c for c in totals if c != "default"]
        if not ranked:  # no candidate correct on every shape: reported, nothing for the table
            print(f"{kernel} w={work} rows={n_rows}: no candidate ran correctly on every shape", flush=True)
            continue
        best = min(ranked, key=totals.get)
        per_shape = {s: min((r for r in mine if r["shape"] == s and r["ok"] and r["config"] != "default"),
                            key=lambda r: r["us"], default={"config": "none"})["config"] for s in shapes}
        default_params = next(r["params"] for r in mine if r["config"] == "default")
        out.append(dict(kernel=kernel, work=work, rows=n_rows, batch=batch, tenants=tenants,
                        default=name(default_params), default_us=totals["default"], best=best,
                        best_params=next(r["params"] for r in mine if r["config"] == best), best_us=totals[best],
                        speedup=totals["default"] / totals[best], per_shape_best=per_shape,
                        wrong=sorted({r["config"] for r in mine if not r["ok"]})))
    return out


def table_entries(summary: list[dict]) -> dict[str, dict[str, int]]:
    """The decode table this run writes: per (kernel, work bucket, rows a tile) the fastest candidate over the
    shapes (each CASES entry reaches its own key)."""
    return {decode_table_key(s["kernel"], G, s["work"], s["rows"]): s["best_params"] for s in summary}


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Decode kernel meta-parameters on {res['device']} (torch {res['torch']}, triton {res['triton']})", "",
             f"`python bench/tune_decode.py` ({res['seconds']:.0f} s). Shapes {', '.join(res['shapes'])} (Llama-2-7B, "
             "~1 bit/param Delta-CoMe tiers, 64 slots), fp16; each kernel alone, CUDA graph replay, L2 flushed; "
             "times in us summed over the shapes (one layer's calls of that kernel). Row i on tenant i % tenants.",
             "", "| kernel | batch | tenants | work | rows a tile | default | default us | fastest | fastest us | "
             "default / fastest | fastest per shape |", "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---|"]
    for s in res["summary"]:
        per = "; ".join(f"{k}: {v}" for k, v in s["per_shape_best"].items())
        lines.append(f"| {s['kernel']} | {s['batch']} | {s['tenants']} | {s['work']} | {s['rows']} | {s['default']} | "
                     f"{s['default_us']:.1f} | {s['best']} | {s['best_us']:.1f} | {s['speedup']:.2f} | {per} |")
    wrong = sorted({c for s in res["summary"] for c in s["wrong"]})
    lines += ["", f"Candidates that failed to compile or whose output differed from the default's on some shape "
              f"(never ranked): {', '.join(wrong) or 'none'}."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = shape_bench_args()
    ap.add_argument("--table", type=Path, default=None,
                    help=f"config table whose decode_configs this run writes (default {CONFIG_DIR}/<GPU name>.json)")
    ap.add_argument("--no-table", action="store_true", help="report only, write no table")
    ap.add_argument("--cases", type=parse_cases, default=CASES,
                    help="BATCHxTENANTS,... to time (default: all); the table keeps the keys they do not reach")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_decode.py times kernels on a CUDA GPU; none is available here")
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    g = torch.Generator(device="cuda").manual_seed(0)
    start = time.time()
    rows = []
    for shape in shapes:
        w = make_weights(shape, SLOTS, g)
        rows += [r for b, t in args.cases for r in time_case(w, b, t, g)]
        del w
        torch.cuda.empty_cache()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               shapes=shapes, rows=rows, summary=summarize(rows, shapes), seconds=time.time() - start)
    (args.out / "decode_tuning.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "decode_tuning.md")
    if not args.no_table:
        table = args.table or CONFIG_DIR / f"{device_slug()}.json"
        about = {k: res[k] for k in ("device", "torch", "triton")} | {"command": " ".join(sys.argv)}
        some = args.cases != CASES
        write_decode_table(table, table_entries(res["summary"]), about, keep_others=some)
        print(f"wrote {table}'s decode_configs ({len(res['summary'])} keys{', the others kept' if some else ''})")
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
