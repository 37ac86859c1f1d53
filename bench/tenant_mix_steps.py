"""Decode steps under a changing tenant mix: step-time percentiles and CUDA-graph captures per graph policy.

A serving batch's mix of tenants changes whenever a request arrives or ends, and the mix decides which delta
kernel variants a decode step launches (engine/decode_graphs.py). With a graph per mix (exact_graph_after=1, the
engine before covering graphs) a new mix stalls every running sequence for a capture; with covering graphs a new
mix replays its batch size's covering graph and gets its own only once it has recurred exact_graph_after times.

One engine, one workload replayed per policy (the graphs with tenant rows dropped in between): requests arrive
at random steps (seeded, the same for every policy), each on a Zipf-popular tenant or the base model, with a
short prompt and a random output length, starting from a running batch. Every engine step is timed on the host
(a step ends with the sampler reading its tokens, so the wall time is the GPU's too). Then fixed mixes are timed
on their own graph and on the covering graph, side by side, to price the covering graph's idle launches.

Usage: python bench/tenant_mix_steps.py [--model llama2-7b|tiny] [--policies 1,16,1000000000] [--steps 600]
           [--tenants 16] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from deltaserve.engine import LLMEngine, SamplingParams
from random_models import block_shapes, random_delta
from serve import model_path
from serve_bench_engine import build_engine, fill_slots, pinned, step_time, sync

NEVER = 10 ** 9   # exact_graph_after that never comes: covering graphs only


def workload(args: argparse.Namespace) -> list[list[tuple[int, int]]]:
    """Per step, the requests arriving then as (tenant slot or -1, max_tokens); step 0 brings the starting batch."""
    rng = np.random.default_rng(args.seed)
    popularity = 1.0 / np.arange(1, args.tenants + 1) ** args.zipf
    popularity /= popularity.sum()

    def request() -> tuple[int, int]:
        slot = -1 if rng.random() < args.base_share else int(rng.choice(args.tenants, p=popularity))
        return slot, int(rng.integers(args.min_tokens, args.max_tokens + 1))

    arrivals = [[request() for _ in range(args.start_batch)]]
    arrivals += [[request() for _ in range(rng.poisson(args.rate))] for _ in range(args.steps - 1)]
    return arrivals


def replay(engine: LLMEngine, arrivals: list[list[tuple[int, int]]], prompt_len: int, seed: int) -> list[dict]:
    """Run the workload to its last step; per step: wall seconds, rows, distinct tenants, tokens, captures during it,
    whether every row decoded (a graph step) and whether a covering graph ran it. Prompts are random tokens from
    `seed`: a new seed per replay, so no replay hits the prefix cache an earlier one left."""
    graphs = engine.runner.graphs
    g = torch.Generator().manual_seed(seed)
    steps, n = [], 0
    for arrived in arrivals:
        for slot, max_tokens in arrived:
            prompt = torch.randint(0, engine.vocab_size, (prompt_len,), generator=g).tolist()
            engine.add_request(f"q{n}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                               ignore_eos=True), slot)
            n += 1
        captures, covering = graphs.captures, graphs.covering_steps
        t0 = time.perf_counter()
        outputs = engine.step()
        wall = time.perf_counter() - t0
        s = engine.stats()
        steps.append({"s": wall, "rows": s.last_batch_size, "tenants": s.last_distinct_slots,
                      "tokens": sum(len(o.new_token_ids) for o in outputs),
                      "decode_only": s.last_num_prefill_tokens == 0, "captures": graphs.captures - captures,
                      "covering": graphs.covering_steps > covering})
    for i in range(n):
        engine.abort(f"q{i}")
    while engine.has_work():
        engine.step()
    return steps


def summary(policy: int, steps: list[dict]) -> dict:
    walls = np.array([s["s"] for s in steps]) * 1e3
    decode = np.array([s["s"] for s in steps if s["decode_only"]]) * 1e3
    tokens = sum(s["tokens"] for s in steps)

    def pct(a: np.ndarray, q: float) -> float:
        return round(float(np.percentile(a, q)), 2) if len(a) else float("nan")

    return {"exact_graph_after": policy, "steps": len(steps), "decode_steps": len(decode),
            "step_ms_p50": pct(walls, 50), "step_ms_p90": pct(walls, 90), "step_ms_p99": pct(walls, 99),
            "step_ms_max": round(float(walls.max()), 1), "decode_step_ms_p50": pct(decode, 50),
            "decode_step_ms_p99": pct(decode, 99), "captures": sum(s["captures"] for s in steps),
            "steps_with_capture": sum(1 for s in steps if s["captures"]),
            "covering_steps": sum(1 for s in steps if s["covering"]), "wall_s": round(float(walls.sum()) / 1e3, 2),
            "tok_s": round(float(tokens / (walls.sum() / 1e3)), 1)}


def fixed_mixes(engine: LLMEngine, mixes: list[tuple[int, int]], args: argparse.Namespace) -> list[dict]:
    """Decode step time of each (batch, tenants) mix on its own graph and on its batch size's covering graph."""
    graphs = engine.runner.graphs
    rows = []
    for batch, tenants in mixes:
        slots = [i % tenants for i in range(batch)]
        times = {}
        for name, policy in (("own", 1), ("covering", NEVER), ("own again", 1)):
            graphs.exact_after = policy
            graphs.drop_tenant_graphs()
            times[name] = step_time(engine, slots, warmup=3, steps=args.fixed_steps, prompt_len=args.prompt_len)
        own = min(times["own"], times["own again"])
        rows.append({"batch": batch, "tenants": tenants, **{f"{k}_ms": round(v * 1e3, 3) for k, v in times.items()},
                     "covering_over_own": round(times["covering"] / own, 3)})
        print(rows[-1], flush=True)
    return rows


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tenant_mix_steps.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Decode steps under a changing tenant mix ({res['device']})", "",
             f"`{res['command']}`; {res['model']}, {res['tenants']} resident tenants (~1 bit/param Delta-CoMe "
             f"tiers), Zipf {res['zipf']} popularity, {res['base_share']:.0%} base-model requests, "
             f"{res['rate']} arrivals a step on average from a batch of {res['start_batch']}, outputs of "
             f"{res['min_tokens']}-{res['max_tokens']} tokens. The same workload replays under each policy on one "
             "engine (graphs with tenant rows dropped in between); each step is timed on the host. "
             f"A first replay of {res['warmup']['steps']} steps, not in the table, took the costs of first use "
             f"({res['warmup']['wall_s']} s, its slowest step {res['warmup']['step_ms_max']} ms).", "",
             "| exact_graph_after | steps | decode-only steps | step ms p50 | p90 | p99 | max | captures | "
             "steps with a capture | steps on covering graphs | wall s | tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["policies"]:
        name = "never (covering only)" if r["exact_graph_after"] >= NEVER else str(r["exact_graph_after"])
        lines.append(f"| {name} | {r['steps']} | {r['decode_steps']} | {r['step_ms_p50']} | {r['step_ms_p90']} | "
                     f"{r['step_ms_p99']} | {r['step_ms_max']} | {r['captures']} | {r['steps_with_capture']} | "
                     f"{r['covering_steps']} | {r['wall_s']} | {r['tok_s']} |")
    lines += ["", "Fixed mixes (row i on tenant i % tenants), decode step time on the mix's own graph (twice, "
              "before and after) and on its batch size's covering graph:", "",
              "| batch | tenants | own graph ms | covering graph ms | own graph again ms | covering / own (best) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in res["fixed"]:
        lines.append(f"| {r['batch']} | {r['tenants']} | {r['own_ms']} | {r['covering_ms']} | {r['own again_ms']} | "
                     f"{r['covering_over_own']} |")
    (out / "tenant_mix_steps.md").write_text("\n".join(lines) + "\n")
    plot(res, out / "tenant_mix_steps.png")


def plot(res: dict, path: Path) -> None:
    """Step wall time against step index, one line per policy (nothing without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    for r, steps in zip(res["policies"], res["steps"]):
        name = "covering only" if r["exact_graph_after"] >= NEVER else f"exact_graph_after={r['exact_graph_after']}"
        ax.plot([s["s"] * 1e3 for s in steps], label=name, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("engine step")
    ax.set_ylabel("step wall time (ms)")
    ax.set_title(f"Decode steps under a changing tenant mix, {res['model']} ({res['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama2-7b", "tiny"], default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--policies", default=f"1,16,{NEVER}", help="exact_graph_after values, in run order")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup-steps", type=int, default=100, help="steps of the unreported first replay")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--base-share", type=float, default=0.1)
    ap.add_argument("--start-batch", type=int, default=24)
    ap.add_argument("--rate", type=float, default=0.15, help="mean arrivals a step")
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--fixed", default="16x8,32x16,64x32", help="BATCHxTENANTS mixes timed on both graphs")
    ap.add_argument("--fixed-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve_bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    path, label = model_path(args)
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    policies = [int(p) for p in args.policies.split(",")]
    # Built with a covering policy, so the start-up warm-up also compiles the covering graphs' kernel variants
    # (a compile inside the first covering capture would be timed as part of its policy's steps).
    engine = build_engine(path, args.device, dtype, max_slots=args.tenants, max_num_seqs=64,
                          max_model_len=args.prompt_len + args.max_tokens + 8, cuda_graphs=True,
                          num_kv_blocks=64 * -(-(args.prompt_len + args.max_tokens + 8) // 16) + 1,
                          exact_graph_after=max(policies + [2]))
    delta = pinned(random_delta(block_shapes(engine.base_shapes), engine.base_fingerprint, seed=1),
                   engine.runner.device)
    print(f"filled {args.tenants} slots in {fill_slots(engine, delta, args.tenants):.1f} s", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    res = {"device": device, "model": label, "command": "python bench/tenant_mix_steps.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("work", "out")),
        "torch": torch.__version__, **{k: getattr(args, k) for k in ("tenants", "zipf", "base_share", "start_batch",
                                                                    "rate", "min_tokens", "max_tokens")},
        "policies": [], "steps": [], "fixed": []}
    arrivals = workload(args)
    graphs = engine.runner.graphs
    # A first replay, not among the policies, takes the costs of first use (first captures, first GEMM shapes), which
    # would otherwise be charged to the first policy. In stop 19's run, made before it, 10 of the first policy's
    # prefill steps took 0.6-1.6 s with no capture: cuDNN's attention building a plan per new shape, since left out
    # (engine/attention.masked_sdpa; after that fix the first replay's slowest step took 0.26 s).
    graphs.exact_after = policies[0]
    res["warmup"] = summary(policies[0], replay(engine, arrivals[:args.warmup_steps], args.prompt_len,
                                                seed=len(policies)))
    print("warm-up replay", res["warmup"], flush=True)
    for run, policy in enumerate(policies):
        graphs.exact_after = policy
        graphs.drop_tenant_graphs()
        sync(engine.runner.device)
        steps = replay(engine, arrivals, args.prompt_len, seed=run)
        res["policies"].append(summary(policy, steps))
        res["steps"].append(steps)
        print(res["policies"][-1], flush=True)
        write(res, args.out)   # after each policy: a run cut short still leaves what it measured
    mixes = [tuple(int(v) for v in m.split("x")) for m in args.fixed.split(",") if m]
    res["fixed"] = fixed_mixes(engine, [(b, t) for b, t in mixes if t <= args.tenants], args)
    write(res, args.out)


if __name__ == "__main__":
    main()
