"""Serving benchmark: tenant capacity and decode throughput of a 7B backbone with ~1 bit/param tenant deltas.

1. Capacity: how many tenants' deltas stay resident on the GPU next to the FP16 backbone with KV room for
   16 sequences x 2048 tokens, at 1.0 and 0.5 bit/param. Planned from the free memory measured after the
   backbone, then proven by building that engine, filling every slot and running a decode step.
2. Decode throughput (tokens/s) through the engine at batch 1, 16, 64, 128 with 1, 8, 32, 64 distinct tenants
   (row i on tenant i % T), in one run for: deltaserve (Triton kernels), the backbone alone (upper bound), the
   engine's PyTorch delta path (dequantize then matmul per tenant), BitDelta (Triton sign kernel), and one merged
   FP16 model per tenant swapped in from pinned host memory (k tokens per residency; serve_bench_swap.py); plus
   each deltaserve step's fraction of the bandwidth bound: (backbone + distinct tenants' deltas + KV bytes read)
   / measured copy bandwidth / step time.

The backbone has Llama-2-7B shapes with random seeded weights (bench/random_models.random_7b, made once in
--work). Deltas are random packed Delta-CoMe deltas with the tier shapes of random_models.deltacome_tiers (and
random BitDelta signs); time depends on shapes and bit-widths, not values. One delta file per method is loaded
into every slot: each slot holds its own copy, so the kernels read distinct bytes for every tenant.

Usage on the GPU machine (one H100 80GB; ~5-6 min including making the 7B checkpoint in --work; --time-budget
stops starting new points or phases after 300 s and marks them skipped, the throughput points already at
--points-share of it; carry .whl), then copy $OUT's files
(serve.json, serve.md, serve.png, serve_bandwidth.png) into bench/results/:
  source bench/device_env.sh && python3 bench/serve.py --model llama2-7b --out $OUT 2>&1 | tee $OUT/serve.log
CPU smoke (~1 min; writes to /tmp):
  PYTHONPATH=bench .venv/bin/python bench/serve.py --model tiny --device cpu --batches 1,4 --tenants 1,2,4 \
      --steps 2 --warmup 1 --torch-steps 1 --capacity-seqs 2 --capacity-len 256 --cpu-memory 64MiB \
      --headroom 4MiB --capacity-max 16 --swap-steps 2 --swap-direct-max 2 --work /tmp/serve_smoke \
      --out /tmp/serve_smoke/results
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import triton

from random_models import block_shapes, random_7b, random_delta
from serve_bench_baselines import bitdelta_phase, skipped, torch_phase
from serve_bench_capacity import capacity_phase
from serve_bench_engine import (DECODE_SLACK, GiB, build_engine, copy_bandwidth, fill_slots, free_bytes,
                                free_device, kv_bytes_per_token, mix, pinned, step_time, stored_bytes)
from serve_bench_output import BASE, OURS, setup_notes, write_all
from serve_bench_swap import MergedSwapper, merged_rows

REPO = Path(__file__).resolve().parent.parent


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    if args.model == "llama2-7b":
        path = random_7b(args.work / "llama2-7b-random", args.device)
        free_device()           # the weights were drawn on the GPU
        return str(path), "Llama-2-7B-shaped (random FP16)"
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_model
    folder = args.work / "tiny-model"
    if not (folder / "config.json").exists():
        make_tiny_model(folder, hidden_size=256, intermediate_size=512)   # Delta-CoMe's fixed tiers need d >= 256
    return str(folder), "tiny random Llama"


class Bench:
    """The run's shared state: arguments, device, copy bandwidth, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = args.dtype or ("float16" if self.device.type == "cuda" else "float32")
        self.path, name = model_path(args)
        self.points = [(b, t) for b in args.batches for t in args.tenants if t <= b]
        self.bw = copy_bandwidth(self.device)
        print(f"copy bandwidth {self.bw / 1e9:.0f} GB/s", flush=True)
        cuda = self.device.type == "cuda"
        self.res = {"model": name, "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
                    "device_memory_bytes": torch.cuda.mem_get_info(self.device)[1] if cuda else args.cpu_memory,
                    "torch": torch.__version__, "triton": triton.__version__, "dtype": self.dtype,
                    "command": shlex.join(["python", *sys.argv]), "copy_bandwidth_gbs": self.bw / 1e9,
                    "prompt_len": args.prompt_len, "warmup": args.warmup, "steps": args.steps,
                    "torch_steps": args.torch_steps, "points": self.points, "capacity": [], "rows": [],
                    "notes": [], "timeline": [], "complete": False, "elapsed_s": 0.0}
        # Every sequence of the throughput engines: prompt, warm-up, timed steps (or k per residency), slack.
        self.seq_len = args.prompt_len + max(args.warmup + args.steps + DECODE_SLACK, args.swap_steps) + 4

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self, margin: float = 0.0, share: float = 1.0) -> bool:
        """Whether the run is within `margin` seconds of `share` of --time-budget: later points and phases are
        skipped."""
        return self.elapsed() > self.args.time_budget * share - margin

    def log(self, what: str) -> None:
        self.res["timeline"].append([round(self.elapsed(), 1), what])
        print(f"[{self.elapsed():6.1f} s] {what}", flush=True)

    def save(self) -> None:
        self.res["elapsed_s"] = self.elapsed()
        write_all(self.res, self.args.out, plots=self.res["complete"])

    def engine(self, slots: int, **options):
        """An engine for the fixed-mix decode points. exact_graph_after=1: each mix gets its own decode graph at its
        first step, the steady state a serving engine reaches once a mix has recurred (engine/decode_graphs.py);
        bench/tenant_mix_steps.py measures the changing mixes."""
        blocks = max(self.args.batches) * -(-self.seq_len // 16) + 1
        return build_engine(self.path, self.args.device, self.dtype, max_slots=max(slots, 1), num_kv_blocks=blocks,
                            max_num_seqs=max(self.args.batches), max_model_len=self.seq_len,
                            **{"exact_graph_after": 1, **options})

    def row(self, engine, system: str, batch: int, tenants: int, step_s: float, delta_bytes: int,
            warmup: int | None = None, steps: int | None = None) -> dict:
        """A measured point (step_time's warm-up and timed steps, the run's unless given); bw_fraction = bytes
        a step must read at least / copy bandwidth / step time, with K/V read at the timed steps' mean context."""
        warmup = self.args.warmup if warmup is None else warmup
        steps = self.args.steps if steps is None else steps
        ctx = self.args.prompt_len + 1 + warmup + (steps - 1) / 2
        kv = batch * ctx * kv_bytes_per_token(engine)
        need = engine.runner.backbone_bytes + tenants * delta_bytes + kv
        r = {"system": system, "batch": batch, "tenants": tenants, "kind": "measured",
             "step_ms": round(step_s * 1e3, 3), "tok_s": round(batch / step_s, 2), "bytes_read_floor": int(need),
             "bw_fraction": round(need / self.bw / step_s, 4)}
        self.res["rows"].append(r)
        print(r, flush=True)
        return r


def deltaserve_phase(bench: Bench) -> dict:
    """deltaserve, backbone alone and merged-model swapping on one engine; returns what capacity planning needs
    (the free memory measured right after this engine loaded its backbone, before any slot was filled)."""
    a, dev = bench.args, bench.device
    max_t = max(a.tenants)
    engine = bench.engine(max_t, slot_bits_per_param=1.0)
    plan = {"free_after_backbone": free_bytes(dev) if dev.type == "cuda" else None,
            "kv_now": (engine.runner.num_blocks + 1) * engine.runner.block_bytes,
            "block_bytes": engine.runner.block_bytes, "backbone_bytes": engine.runner.backbone_bytes,
            "matrix_params": sum(math.prod(s) for s in engine.base_shapes.values() if len(s) == 2),
            "shapes": block_shapes(engine.base_shapes, a.with_embeddings), "fingerprint": engine.base_fingerprint}
    bench.res["backbone_bytes"] = plan["backbone_bytes"]
    bench.log(f"deltaserve engine built ({max_t} slots); making the deltas")
    plan["deltas"] = {bits: pinned(random_delta(plan["shapes"], plan["fingerprint"], seed=1, bits_per_param=bits), dev)
                      for bits in sorted({1.0, *a.capacity_bits}, reverse=True)}
    bench.res["delta_bytes"] = {f"deltacome_{b}": stored_bytes(d) for b, d in plan["deltas"].items()}
    bench.res["delta_bits_per_param"] = {f"deltacome_{b}": 8 * stored_bytes(d) / plan["matrix_params"]
                                         for b, d in plan["deltas"].items()}
    delta = plan["deltas"][1.0]
    size = stored_bytes(delta)
    bench.log(f"filled {max_t} slots in {fill_slots(engine, delta, max_t):.1f} s ({size / 1e9:.3f} GB each)")
    base: dict[int, float] = {}

    def base_step(n: int) -> float:
        if n not in base:
            base[n] = step_time(engine, [-1] * n, a.warmup, a.steps, a.prompt_len)
        return base[n]
    late = "skipped: past the run's time budget"
    # The throughput points get their share of the budget only, so the phases after them (swapping, capacity,
    # the baselines) still run when autotuning makes the points slow.
    for b in a.batches:
        if bench.over_budget(share=a.points_share):
            skipped(bench, BASE, b, 0, late)
        else:
            bench.row(engine, BASE, b, 0, base_step(b), 0)
        for t in [t for b2, t in bench.points if b2 == b]:
            if bench.over_budget(share=a.points_share):
                skipped(bench, OURS, b, t, late)
            else:
                bench.row(engine, OURS, b, t, step_time(engine, mix(b, t), a.warmup, a.steps, a.prompt_len), size)
    bench.log("deltaserve and backbone points done; merged-model swapping")
    bench.save()
    swapper = MergedSwapper(engine)
    bench.res["merged_model_bytes"] = swapper.nbytes
    bench.res["rows"] += merged_rows(engine, swapper, bench.points, a.swap_steps, a.swap_direct_max, base_step,
                                     a.prompt_len, bench.over_budget)
    bench.res["swap_seconds"] = [round(s, 4) for s in swapper.swap_seconds]
    bench.log("merged-model swapping done")
    return plan


def parse_args() -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",")]

    def size(s: str) -> int:
        units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "GB": 10**9}
        for u, m in units.items():
            if s.endswith(u):
                return int(float(s[: -len(u)]) * m)
        return int(s)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama2-7b", "tiny"], default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve_bench"), help="keeps the random 7B")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--batches", type=ints, default=[1, 16, 64, 128])
    ap.add_argument("--tenants", type=ints, default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps per point (autotuning, graphs)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    ap.add_argument("--torch-steps", type=int, default=2, help="timed steps of the slow PyTorch delta path")
    ap.add_argument("--torch-tenants", type=ints, default=[1, 8], help="tenant counts the PyTorch path runs")
    ap.add_argument("--torch-budget", type=float, default=40.0, help="seconds for the PyTorch path's points")
    ap.add_argument("--swap-steps", type=int, default=16, help="tokens per residency of a merged model")
    ap.add_argument("--swap-direct-max", type=int, default=8, help="merged swapping measured by whole rounds up "
                    "to this many tenants, derived from one swap and step times above")
    ap.add_argument("--capacity-bits", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5])
    ap.add_argument("--capacity-seqs", type=int, default=16)
    ap.add_argument("--capacity-len", type=int, default=2048)
    ap.add_argument("--capacity-max", type=int, default=0, help="cap on the slots tried (0: none)")
    ap.add_argument("--headroom", type=size, default=GiB, help="device memory kept free in capacity planning")
    ap.add_argument("--cpu-memory", type=size, default=256 << 20, help="CPU runs: the pretend device memory")
    ap.add_argument("--with-embeddings", action="store_true", help="deltas also for embed_tokens and lm_head")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds from the start after which no "
                    "further point or phase starts (skipped ones are marked); the 10-minute GPU call's guard")
    ap.add_argument("--points-share", type=float, default=0.5, help="share of --time-budget after which no "
                    "further deltaserve/backbone throughput point starts")
    ap.add_argument("--skip", default="", help="comma-separated phases to leave out: capacity,bitdelta,torch")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    skip = set(filter(None, args.skip.split(",")))
    bench.res["notes"] = setup_notes(args, bench.res["model"], bench.dtype)
    if bench.device.type != "cuda":
        bench.res["notes"].append("CPU run (smoke test): every delta path is the PyTorch reference; numbers mean "
                                  "nothing about the GPU.")
    plan = deltaserve_phase(bench)
    free_device()
    if bench.device.type == "cuda":     # what a freed engine left behind is subtracted from capacity planning
        plan["leftover"] = bench.res["allocated_after_free_bytes"] = torch.cuda.memory_allocated(bench.device)
        bench.log(f"deltaserve engine freed; {plan['leftover'] / 1e9:.2f} GB still allocated")
    bench.save()
    for name, phase in (("capacity", capacity_phase), ("bitdelta", bitdelta_phase), ("torch", torch_phase)):
        if name in skip:
            continue
        if bench.over_budget(margin=40):        # no time left for an engine build, its fill and a few points
            bench.res["skipped_phases"] = bench.res.get("skipped_phases", []) + [name]
            bench.log(f"phase {name} skipped: past the time budget")
        else:
            bench.log(f"phase {name}")
            phase(bench, plan)
            free_device()
            bench.save()
    bench.res["complete"] = True
    bench.log("done")
    bench.save()
    print((args.out / "serve.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
