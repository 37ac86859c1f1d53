"""Launch variants of the dense path's dequantize kernel (kernels/lowrank_dense.py) on the GPU, side by side.

Times dequantized_factors for one tenant of the Llama-2-7B o and qkv shapes (~1 bit/param Delta-CoMe tiers) under
each candidate DEQUANT_CONFIG, in fp16 and bf16, and reports the bandwidth on the bytes it moves (fp16 factors
written, zeros included, plus the packed codes read) against the measured copy bandwidth. The fastest candidate
is what lowrank_dense.DEQUANT_CONFIG should hold.

Usage (GPU): python bench/dequant_variants.py [--out DIR]   (writes dequant_variants.json and .md)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deltaserve.kernels import lowrank_dense
from deltaserve.kernels.bitplanes import UNPACK_NAMES
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from kernel_bench import copy_bandwidth, make_weights, ms
from random_models import G

# A first run (same script) also had BLOCK_R 64 and 8 warps: always slower than 16/32 with 4 warps.
CANDIDATES = [(block_r, unpack, warps) for block_r in (8, 16, 32) for unpack in UNPACK_NAMES for warps in (2, 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth() / 1e9  # GB/s
    rows = []
    for shape in ("o", "qkv"):
        w = make_weights(shape, 4, g)
        plan = lowrank_plan_for(w.lowrank)
        for dtype in (torch.float16, torch.bfloat16):
            written = plan.dense_width * (w.d_in + plan.max_d_out) * dtype.itemsize
            moved = 2 * written + w.slot_bytes  # zeros, then the factors; the codes read once
            for block_r, unpack, warps in CANDIDATES:
                lowrank_dense.DEQUANT_CONFIG.update(BLOCK_R=block_r, UNPACK=UNPACK_NAMES.index(unpack),
                                                    num_warps=warps)
                us = 1e3 * ms(lambda: lowrank_dense.dequantized_factors(plan, 1, w.d_in, G, dtype), quick=False)
                rows.append(dict(shape=shape, dtype=str(dtype)[6:], block_r=block_r, unpack=unpack, num_warps=warps,
                                 us=us, gbs=moved / us / 1e3, frac_copy_bw=moved / us / 1e3 / bw))
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dequant_variants.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "copy_bw_gbs": bw, "rows": rows}, indent=1) + "\n")
    lines = [f"# Dequantize kernel variants ({torch.cuda.get_device_name()})", "",
             "`python bench/dequant_variants.py`: dequantized_factors for one tenant, CUDA graph replay, L2 "
             f"flushed; bytes = fp16 factors written twice (zeros, then values) + packed codes read; copy "
             f"bandwidth {bw:.0f} GB/s.", "",
             "| shape | dtype | BLOCK_R | UNPACK | warps | us | GB/s | of copy BW |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['dtype']} | {r['block_r']} | {r['unpack']} | {r['num_warps']} | {r['us']:.1f} | "
              f"{r['gbs']:.0f} | {r['frac_copy_bw']:.0%} |" for r in rows]
    (args.out / "dequant_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
