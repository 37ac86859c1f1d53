"""Which kernels should take row tiles of 2..4 rows: the decode (bit-serial) kernels or tl.dot, by tile count.

For each Llama-2-7B shape and each step of T tenants with h rows each (h = 2 or 4), times add_lowrank_delta (and
its shrink and expand launches alone) and add_sign_delta (CUDA graph replay, L2 flushed, as bench/kernel_bench.py)
with DECODE_ROWS forced to 1 (the tiles take the tl.dot kernels) and to h (the decode kernels), in one process.
tuning.DECODE_ROWS_POLICY (each kernel's tallest decode tile and tile-count threshold) comes from this table.

Usage: python bench/decode_rows_sweep.py [--out DIR] [--shapes qkv,...]
(writes decode_rows_sweep.json and decode_rows_sweep.md)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import triton

from deltaserve.kernels import SlotMetadata
from deltaserve.kernels.lowrank_delta import add_lowrank_delta_triton
from deltaserve.kernels.lowrank_expand import expand_triton
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_shrink import shrink_triton
from deltaserve.kernels.sign_delta import add_sign_delta_triton
from deltaserve.kernels.tuning import KERNELS, forced_decode_rows
from kernel_bench import copy_bandwidth, make_weights, ms, shape_bench_args
from random_models import G

ROWS_PER_TENANT = (2, 4)
TENANTS = (1, 4, 8, 16, 32, 64)


def sweep_shape(name: str, g: torch.Generator, bw: float) -> list[dict]:
    w = make_weights(name, max(TENANTS), g)
    plan = lowrank_plan_for(w.lowrank)
    out = []
    for h in ROWS_PER_TENANT:
        for T in TENANTS:
            B = h * T
            x = torch.randn(B, w.d_in, device="cuda", dtype=torch.float16, generator=g)
            y = torch.randn(B, sum(w.d_outs), device="cuda", dtype=torch.float16, generator=g)
            slots = [t for t in range(T) for _ in range(h)]
            row = dict(shape=name, rows_per_tenant=h, tenants=T, batch=B)
            for rows, label in ((1, "dot"), (h, "decode")):
                with forced_decode_rows(rows):
                    meta = SlotMetadata.from_host(slots, max(TENANTS), x.device)
                    assert all(meta.tile_kinds(k).decode == (label == "decode") for k in KERNELS)
                    row[f"{label}_lowrank_us"] = 1e3 * ms(
                        lambda: add_lowrank_delta_triton(y, x, meta, w.lowrank, G, plan), quick=True)
                    row[f"{label}_sign_us"] = 1e3 * ms(lambda: add_sign_delta_triton(y, x, meta, w.signs), quick=True)
                    z = shrink_triton(x, meta, plan, G)
                    row[f"{label}_shrink_us"] = 1e3 * ms(lambda: shrink_triton(x, meta, plan, G), quick=True)
                    row[f"{label}_expand_us"] = 1e3 * ms(lambda: expand_triton(y, z, meta, plan, G), quick=True)
            row["lowrank_decode_speedup"] = row["dot_lowrank_us"] / row["decode_lowrank_us"]
            row["sign_decode_speedup"] = row["dot_sign_us"] / row["decode_sign_us"]
            row["decode_frac_copy_bw"] = (T * w.slot_bytes + 2 * B * (w.d_in + 2 * sum(w.d_outs))) / (
                row["decode_lowrank_us"] * 1e-6) / bw
            print(f"{name:8s} h={h} T={T:2d}: low-rank dot {row['dot_lowrank_us']:7.1f} decode "
                  f"{row['decode_lowrank_us']:7.1f} us (x{row['lowrank_decode_speedup']:.2f}; shrink "
                  f"{row['dot_shrink_us']:.1f} / {row['decode_shrink_us']:.1f}, expand {row['dot_expand_us']:.1f} / "
                  f"{row['decode_expand_us']:.1f}); sign dot {row['dot_sign_us']:6.1f} decode "
                  f"{row['decode_sign_us']:6.1f} us", flush=True)
            out.append(row)
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Row tiles of 2-4 rows: decode kernels vs tl.dot, on {res['device']} (triton {res['triton']})", "",
             f"Command: `python bench/decode_rows_sweep.py`. Copy bandwidth in the same run {res['copy_bw_gbs']:.0f} "
             "GB/s. Each step: T tenants with h rows each (fp16, ~1 bit/param Delta-CoMe tiers, group 128), timed "
             "with DECODE_ROWS forced to 1 (tiles on the tl.dot kernels) and to h (decode kernels); device time in "
             "us, CUDA graph replay, L2 flushed. Speedup > 1: the decode kernels are faster.", "",
             "| shape | rows/tenant | tenants | low-rank tl.dot | low-rank decode | speedup | decode: of copy BW "
             "| shrink tl.dot / decode | expand tl.dot / decode | sign tl.dot | sign decode | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['rows_per_tenant']} | {r['tenants']} | {r['dot_lowrank_us']:.1f} | "
                     f"{r['decode_lowrank_us']:.1f} | {r['lowrank_decode_speedup']:.2f} | "
                     f"{r['decode_frac_copy_bw']:.1%} | {r['dot_shrink_us']:.1f} / {r['decode_shrink_us']:.1f} | "
                     f"{r['dot_expand_us']:.1f} / {r['decode_expand_us']:.1f} | {r['dot_sign_us']:.1f} | "
                     f"{r['decode_sign_us']:.1f} | "
                     f"{r['sign_decode_speedup']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = shape_bench_args()
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    start = time.time()
    bw = copy_bandwidth()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy_bw_gbs=bw / 1e9, rows=[r for name in args.shapes.split(",") for r in sweep_shape(name, g, bw)])
    res["seconds"] = time.time() - start
    (args.out / "decode_rows_sweep.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "decode_rows_sweep.md")
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
