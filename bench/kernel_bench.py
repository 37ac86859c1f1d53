"""Delta kernels on the GPU at Llama-2-7B shapes: time, bandwidth against the measured copy bandwidth, baselines.

Deltas are ~1 bit/param with Delta-CoMe's tiering (2 ranks at 8 bits, 32 at 3, the rest at 2 up to the
budget, every fp16 scale and fp32 singular value counted); codes and scales are random, since the time
depends on sizes, not values. Baselines per call: (a) the PyTorch path (dequantize each tenant's factors in
fp16, then matmul, tenant by tenant), (b) a dense fp16 delta matmul per tenant, (c) the BitDelta kernel
(1 bit/param: the same bytes). Then every linear of one decode layer, backbone plus deltas.

Usage: python bench/kernel_bench.py [--out DIR] [--quick] [--shapes qkv,...] [--decode-only]
(writes kernels.json, kernels.md, kernels.png; --decode-only leaves out the prefill and whole-layer sections)
(bench/tune_kernels.py times each kernel's launch configs, unpacking strategies included, and writes the table.)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from deltaserve.delta_store.packing import num_groups, num_words
from deltaserve.kernels import LowRankProjection, SlotMetadata, SignProjection
from deltaserve.kernels.lowrank_delta import add_lowrank_delta_reference, add_lowrank_delta_triton
from deltaserve.kernels.lowrank_dense import DENSE_MIN_ROWS
from deltaserve.kernels.lowrank_expand import expand_triton
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_shrink import shrink_triton
from deltaserve.kernels.random_slots import random_signs, random_tier
from deltaserve.kernels.sign_delta import add_sign_delta_reference, add_sign_delta_triton
from random_models import G, deltacome_tiers

HIDDEN, FFN = 4096, 11008
# name -> (d_in, output widths of the stacked projections)
SHAPES = {"qkv": (HIDDEN, [HIDDEN] * 3), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [FFN] * 2),
          "down": (FFN, [HIDDEN])}
BATCHES, TENANTS = (1, 16, 64, 256), (1, 4, 16, 32, 64)


def packed_bytes(d_in: int, d_out: int, tiers: list[tuple[int, int]]) -> int:
    return sum(r * (4 * b * (num_words(d_in) + num_words(d_out)) + 2 * (num_groups(d_in, G) + num_groups(d_out, G))
                    + 4) for r, b in tiers)


@dataclass
class Weights:
    """One stacked linear's deltas for S slots, in both formats."""
    name: str
    d_in: int
    d_outs: list[int]
    lowrank: list[LowRankProjection]
    signs: list[SignProjection]
    slot_bytes: int  # packed low-rank bytes of one slot, all projections
    sign_slot_bytes: int


def make_weights(name: str, S: int, g: torch.Generator) -> Weights:
    d_in, d_outs = SHAPES[name]
    lowrank, signs, offset, nbytes = [], [], 0, 0
    for d_out in d_outs:
        tiers = deltacome_tiers(d_in, d_out)
        lowrank.append(LowRankProjection(offset, d_out, [random_tier([r] * S, [b] * S, r, b, d_in, d_out, G, g)
                                                         for r, b in tiers]))
        signs.append(random_signs(S, d_in, d_out, offset, g))
        offset, nbytes = offset + d_out, nbytes + packed_bytes(d_in, d_out, tiers)
    sign_bytes = sum(4 * d * num_words(d_in) + 4 for d in d_outs)
    return Weights(name, d_in, d_outs, lowrank, signs, nbytes, sign_bytes)


def torch_path(y: torch.Tensor, x: torch.Tensor, groups: list[tuple[int, torch.Tensor]], w: Weights) -> None:
    """Baseline (a): per tenant, dequantize every tier to fp16 with torch ops, then three matmuls."""
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)

    def deq(planes: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
        b, r, words = planes.shape
        bits = (planes.unsqueeze(-1) >> shifts) & 1  # [b, r, W, 32]
        codes = (bits << torch.arange(b, device=x.device, dtype=torch.int32).view(b, 1, 1, 1)).sum(0)
        codes = codes.view(r, words * 32)[:, :d].half() - (2**b - 1) / 2
        return codes * scales.repeat_interleave(G, dim=1)[:, :d]

    for slot, rows in groups:
        xs = x[rows]
        for p in w.lowrank:
            acc = None
            for t in p.tiers:
                r, b = t.rank_cap, t.bits_cap  # every slot uses the full tier here
                v = deq(t.v_planes[slot, :b, :r], t.v_scales[slot, :r], w.d_in)
                u = deq(t.u_planes[slot, :b, :r], t.u_scales[slot, :r], p.d_out)
                part = ((xs @ v.T) * t.s[slot, :r].half()) @ u
                acc = part if acc is None else acc + part
            y[rows, p.out_offset:p.out_offset + p.d_out] += acc


def dense_path(y: torch.Tensor, x: torch.Tensor, groups: list[tuple[int, torch.Tensor]],
               dense: list[torch.Tensor]) -> None:
    """Baseline (b): per tenant, y_rows += x_rows @ delta^T with the delta stored dense in fp16."""
    for slot, rows in groups:
        y[rows] += x[rows] @ dense[slot].T


def ms(fn, quick: bool, graph: bool = True) -> float:
    """Median ms of fn on the device, L2 flushed before each run (do_bench). With graph=True fn is captured
    in a CUDA graph first (as an engine step would be), so the time is the device's, without Python's
    launch overhead; fn runs once before capture so Triton compiles outside it."""
    fn()
    run = fn
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    return do_bench(run, warmup=5 if quick else 10, rep=15 if quick else 40, return_mode="median")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_correctness(g: torch.Generator) -> dict:
    """Triton vs the PyTorch reference on the GPU (7B qkv shapes, 8 tenants, decode and prefill)."""
    w = make_weights("qkv", 8, g)
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        for rows in (16, 300):
            x = torch.randn(rows, w.d_in, device="cuda", generator=g).to(dtype)
            y0 = torch.randn(rows, sum(w.d_outs), device="cuda", generator=g).to(dtype)
            slots = torch.randint(-1, 8, (rows,), device="cuda", generator=g, dtype=torch.int32)
            meta = SlotMetadata.build(slots, 8)
            for kind, kern, ref, proj in (("lowrank", add_lowrank_delta_triton, add_lowrank_delta_reference, w.lowrank),
                                          ("sign", add_sign_delta_triton, add_sign_delta_reference, w.signs)):
                got, want = y0.clone(), y0.clone()
                args = (meta, proj, G) if kind == "lowrank" else (meta, proj)
                kern(got, x, *args)
                ref(want, x, *args)
                base = slots < 0
                out[f"{kind}_{str(dtype)[6:]}_B{rows}"] = {
                    "delta_rel_err": rel_err((got.float() - y0.float())[~base], (want.float() - y0.float())[~base]),
                    "base_rows_untouched": bool(torch.equal(got[base], y0[base]))}
    return out


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (t * 1e-3)


def bench_shape(name: str, g: torch.Generator, bw: float, quick: bool) -> list[dict]:
    w = make_weights(name, max(TENANTS), g)
    dense = [torch.randn(sum(w.d_outs), w.d_in, device="cuda", dtype=torch.float16, generator=g) * 0.01
             for _ in range(max(TENANTS))]
    rows_out = []
    for B in BATCHES:
        for T in (t for t in TENANTS if t <= B):
            x = torch.randn(B, w.d_in, device="cuda", dtype=torch.float16, generator=g)
            y = torch.randn(B, sum(w.d_outs), device="cuda", dtype=torch.float16, generator=g)
            slots = (torch.arange(B, device="cuda", dtype=torch.int32) % T)  # T distinct tenants, round robin
            meta = SlotMetadata.build(slots, max(TENANTS))
            groups = [(s, meta.sorted_rows[a:a + n].long()) for s, a, n in
                      zip(meta.seg_slots.tolist(), meta.seg_starts.tolist(), meta.seg_lens_host)]
            plan = lowrank_plan_for(w.lowrank)
            z = shrink_triton(x, meta, plan, G)
            rest, long_segments = meta.split_long(DENSE_MIN_ROWS)
            path = "kernels" if not long_segments else "dense" if rest is None else "dense + kernels"
            t_kernel = ms(lambda: add_lowrank_delta_triton(y, x, meta, w.lowrank, G), quick)
            t_eager = ms(lambda: add_lowrank_delta_triton(y, x, meta, w.lowrank, G), quick, graph=False)
            t_shrink = ms(lambda: shrink_triton(x, meta, plan, G), quick)
            t_expand = ms(lambda: expand_triton(y, z, meta, plan, G), quick)
            t_sign = ms(lambda: add_sign_delta_triton(y, x, meta, w.signs), quick)
            t_torch = ms(lambda: torch_path(y, x, groups, w), quick)
            t_dense = ms(lambda: dense_path(y, x, groups, dense), quick)
            io = 2 * B * (w.d_in + 2 * sum(w.d_outs))  # x read, y read and written (fp16)
            moved = T * w.slot_bytes + io
            row = dict(shape=name, batch=B, tenants=T, path=path, kernel_us=t_kernel * 1e3,
                       kernel_eager_us=t_eager * 1e3,
                       shrink_us=t_shrink * 1e3, expand_us=t_expand * 1e3, bytes_moved=moved,
                       achieved_gbs=moved / t_kernel / 1e6, frac_copy_bw=moved / (t_kernel * 1e-3) / bw,
                       sign_us=t_sign * 1e3, sign_frac_copy_bw=(T * w.sign_slot_bytes + io) / (t_sign * 1e-3) / bw,
                       torch_us=t_torch * 1e3, dense_us=t_dense * 1e3, speedup_vs_torch=t_torch / t_kernel,
                       speedup_vs_dense=t_dense / t_kernel, speedup_vs_bitdelta=t_sign / t_kernel)
            rows_out.append(row)
            print(f"{name:8s} B={B:3d} T={T:2d} {path:15s} {row['kernel_us']:7.1f} us (shrink {row['shrink_us']:6.1f}, "
                  f"expand {row['expand_us']:6.1f}, eager {row['kernel_eager_us']:6.0f})  "
                  f"{row['frac_copy_bw']:5.1%} of copy  torch x{row['speedup_vs_torch']:5.1f}  "
                  f"dense x{row['speedup_vs_dense']:5.1f}  bitdelta x{row['speedup_vs_bitdelta']:4.2f}", flush=True)
    return rows_out


def bench_prefill(g: torch.Generator, bw: float, quick: bool) -> list[dict]:
    """Prefill: 2048 prompt tokens split over T tenants, 4096 -> 4096 (add_lowrank_delta: the dense path here)."""
    w = make_weights("o", 16, g)
    base = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    out = []
    for T in (1, 4, 16):
        x = torch.randn(2048, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
        y = torch.randn(2048, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
        meta = SlotMetadata.build(torch.arange(2048, device="cuda", dtype=torch.int32) * T // 2048, 16)
        t = ms(lambda: add_lowrank_delta_triton(y, x, meta, w.lowrank, G), quick)
        t_mm = ms(lambda: torch.mm(x, base.T), quick)
        ranks = sum(r for r, _ in deltacome_tiers(HIDDEN, HIDDEN))
        tflops = 2 * 2048 * ranks * 2 * HIDDEN / (t * 1e-3) / 1e12
        out.append(dict(tokens=2048, tenants=T, kernel_us=t * 1e3, delta_tflops=tflops,
                        base_matmul_us=t_mm * 1e3))
        print(f"prefill 2048 tok T={T:2d}: {t * 1e3:7.1f} us ({tflops:.0f} TFLOP/s), base matmul {t_mm * 1e3:.1f} us")
    return out


def bench_layer(g: torch.Generator, bw: float, quick: bool, B: int = 64, T: int = 32) -> dict:
    """All linears of one 7B decode layer (backbone fp16 matmuls + low-rank deltas) at batch 64, 32 tenants."""
    ws = {n: make_weights(n, T, g) for n in SHAPES}
    backbone = {n: torch.randn(sum(w.d_outs), w.d_in, device="cuda", dtype=torch.float16, generator=g) * 0.02
                for n, w in ws.items()}
    xs = {n: torch.randn(B, w.d_in, device="cuda", dtype=torch.float16, generator=g) for n, w in ws.items()}
    meta = SlotMetadata.build(torch.arange(B, device="cuda", dtype=torch.int32) % T, T)

    def layer(with_delta: bool) -> None:
        for n, w in ws.items():
            y = xs[n] @ backbone[n].T
            if with_delta:
                add_lowrank_delta_triton(y, xs[n], meta, w.lowrank, G)

    t_full, t_base = ms(lambda: layer(True), quick, graph=False), ms(lambda: layer(False), quick)
    graph_us = ms(lambda: layer(True), quick) * 1e3
    floor_bytes = sum(b.numel() * 2 for b in backbone.values()) + T * sum(w.slot_bytes for w in ws.values())
    floor_us = floor_bytes / bw * 1e6
    out = dict(batch=B, tenants=T, layer_us=t_full * 1e3, layer_graph_us=graph_us, backbone_only_us=t_base * 1e3,
               floor_bytes=floor_bytes, floor_us=floor_us, ratio_to_floor=t_full * 1e3 / floor_us,
               graph_ratio_to_floor=graph_us / floor_us)
    print("layer:", json.dumps(out))
    return out


def write_markdown(res: dict, path: Path) -> None:
    bw = res["copy_bw_gbs"]
    lines = [f"# Delta kernels on {res['device']} (torch {res['torch']}, triton {res['triton']})", "",
             f"Copy bandwidth measured in the same run: {bw:.0f} GB/s (read + write). fp16 activations, "
             f"group size {G}, ~1 bit/param Delta-CoMe tiers per weight: " +
             ", ".join(f"{n} {deltacome_tiers(*SHAPES[n][:1], SHAPES[n][1][0])}" for n in SHAPES) + ".", "",
             "## Correctness on the GPU (Triton vs PyTorch reference, relative error of the delta)", "",
             "| case | rel. error | base rows untouched |", "|---|---|---|"]
    lines += [f"| {k} | {v['delta_rel_err']:.2e} | {v['base_rows_untouched']} |" for k, v in res["correctness"].items()]
    lines += ["", "## Decode (device time in us, CUDA graph replay, L2 flushed; eager = the same call from Python; "
              "bandwidth on packed bytes of distinct slots + x + y)", "",
              f"kernel: add_lowrank_delta, through `path`: the shrink and expand kernels, or for a tenant with "
              f"{DENSE_MIN_ROWS}+ rows the dense path (kernels/lowrank_dense.py: factors dequantized once, two GEMMs); "
              f"the shrink and expand columns time the kernels on every row either way. A captured decode graph "
              f"(the engine's decode steps) always takes the kernels.", "",
              "| shape | batch | tenants | path | kernel | eager | shrink | expand | GB/s | of copy BW | x torch path "
              "| x dense fp16 | x BitDelta (equal bytes) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['tenants']} | {r['path']} | {r['kernel_us']:.1f} | "
              f"{r['kernel_eager_us']:.0f} | "
              f"{r['shrink_us']:.1f} | {r['expand_us']:.1f} | {r['achieved_gbs']:.0f} | {r['frac_copy_bw']:.0%} | "
              f"{r['speedup_vs_torch']:.1f} | {r['speedup_vs_dense']:.1f} | {r['speedup_vs_bitdelta']:.2f} |"
              for r in res["decode"]]
    if "layer" not in res:  # --decode-only
        path.write_text("\n".join(lines + [""]))
        return
    lines += ["", f"## Prefill (4096 -> 4096; {DENSE_MIN_ROWS}+ rows a tenant: the dense path)", "",
              "| tokens | tenants | kernel us | delta TFLOP/s | "
              "base matmul us |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['tenants']} | {r['kernel_us']:.1f} | {r['delta_tflops']:.0f} | "
              f"{r['base_matmul_us']:.1f} |" for r in res["prefill"]]
    L = res["layer"]
    lines += ["", f"## One 7B decode layer, all linears, batch {L['batch']}, {L['tenants']} tenants", "",
              f"- backbone + deltas: {L['layer_graph_us']:.0f} us as a CUDA graph, {L['layer_us']:.0f} us eager "
              f"(Python launch overhead included); backbone alone {L['backbone_only_us']:.0f} us",
              f"- floor (backbone weights + {L['tenants']} packed deltas, {L['floor_bytes'] / 1e6:.0f} MB, read once at "
              f"copy bandwidth): {L['floor_us']:.0f} us; ratio {L['graph_ratio_to_floor']:.2f} as a graph, "
              f"{L['ratio_to_floor']:.2f} eager", ""]
    path.write_text("\n".join(lines))


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in SHAPES:
        rows = [r for r in res["decode"] if r["shape"] == name and r["batch"] == 64]
        axes[0].plot([r["tenants"] for r in rows], [r["frac_copy_bw"] for r in rows], marker="o", label=name)
        axes[1].plot([r["tenants"] for r in rows], [r["speedup_vs_torch"] for r in rows], marker="o", label=name)
    axes[0].axhline(0.7, ls="--", c="gray")
    axes[1].axhline(5, ls="--", c="gray")
    for ax, title in zip(axes, ("fraction of copy bandwidth, batch 64", "speedup over PyTorch path, batch 64")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct tenants")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def shape_bench_args() -> argparse.ArgumentParser:
    """The options every kernel benchmark at SHAPES takes: --out DIR (default bench/results) and --shapes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    return ap


def main() -> None:
    ap = shape_bench_args()
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    ap.add_argument("--decode-only", action="store_true",
                    help="skip prefill and the whole-layer run (the same files, without those sections)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    start = time.time()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    res["correctness"] = check_correctness(g)
    print(json.dumps(res["correctness"], indent=1), flush=True)
    bw = copy_bandwidth()
    res["copy_bw_gbs"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    res["decode"] = [r for name in args.shapes.split(",") for r in bench_shape(name, g, bw, args.quick)]
    if not args.decode_only:
        torch.cuda.empty_cache()
        res["prefill"] = bench_prefill(g, bw, args.quick)
        res["layer"] = bench_layer(g, bw, args.quick)
    res["seconds"] = time.time() - start
    (args.out / "kernels.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "kernels.md")
    res["plot"] = plot(res, args.out / "kernels.png")
    print(f"done in {res['seconds']:.0f} s; plot written: {res['plot']}")


if __name__ == "__main__":
    main()
