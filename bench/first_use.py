"""First-use latency: what a request pays when it is the first of its shape on a fresh machine.

A Triton kernel compiles the first time a launch needs a variant nobody compiled yet (new constexprs, or a new
specialization of an int argument), and the compile happens inside that step, stalling every running sequence
(the 7B and SmolLM2 load runs saw a 2 s TTFT for a tenant already on the GPU); so does a decode CUDA graph the
first time a step needs it. This script plays a fixed list of request patterns on one engine, in order, each
pattern waiting for the last to finish, and records per pattern: the wall time until every request of it
finished, its slowest TTFT, the Triton kernels compiled meanwhile (new .cubin files in the run's own, initially
empty, Triton cache) and the decode graphs captured meanwhile. The last pattern repeats an
earlier one, when nothing is new any more: the steady-state time of that shape.

Each build runs in its own process with an empty TRITON_CACHE_DIR, as on a fresh machine or container.
--builds compares checkouts side by side in one run: label=ROOT, where ROOT holds a `deltaserve` package.

Usage: python bench/first_use.py --model llama2-7b|tiny [--builds before=/tmp/a,after=/tmp/b]
           [--no-warmup before] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Pattern:
    name: str
    tenants: list[int]         # slot of each request (-1 = base)
    prompt_len: int
    prompt_seed: int           # equal seeds: equal prompts (a repeated prompt hits the prefix cache)


def patterns(num_tenants: int) -> list[Pattern]:
    t = num_tenants
    return [
        Pattern("1 tenant, 100-token prompt (first request)", [0], 100, 1),
        Pattern("same request again (prefix-cache hit: short prefill)", [0], 100, 1),
        Pattern("base model, 100-token prompt", [-1], 100, 2),
        Pattern(f"{t} tenants at once, 40-token prompts", list(range(t)), 40, 3),
        Pattern(f"{4 * t} requests over {t} tenants, 20-token prompts", [i % t for i in range(4 * t)], 20, 4),
        Pattern("1 tenant, 300-token prompt", [1 % t], 300, 5),
        Pattern(f"{8 * t} requests over {t} tenants, 24-token prompts", [i % t for i in range(8 * t)], 24, 6),
        Pattern(f"{t} tenants at once again, new prompts (steady state)", list(range(t)), 40, 7),
    ]


def compiled(cache: Path) -> set[Path]:
    """Kernels in a Triton cache directory (one .cubin each)."""
    return set(cache.rglob("*.cubin"))


def play(engine, pattern: Pattern, max_tokens: int, cache: Path) -> dict:
    """Run one pattern to completion; its wall time, slowest TTFT and the compiles it caused."""
    import torch
    from deltaserve.engine import SamplingParams
    g = torch.Generator().manual_seed(pattern.prompt_seed)
    prompts = [torch.randint(0, engine.vocab_size, (pattern.prompt_len,), generator=g).tolist()
               for _ in pattern.tenants]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = compiled(cache)
    captures_before = graph_captures(engine)
    t0 = time.perf_counter()
    ids = [f"{pattern.prompt_seed}-{i}" for i in range(len(prompts))]
    for rid, prompt, slot in zip(ids, prompts, pattern.tenants):
        engine.add_request(rid, prompt, params, slot)
    ttft: dict[str, float] = {}
    done: set[str] = set()
    while len(done) < len(ids):
        for out in engine.step():
            ttft.setdefault(out.request_id, time.perf_counter() - t0)
            if out.finished:
                done.add(out.request_id)
    wall = time.perf_counter() - t0
    new = sorted(p.stem for p in compiled(cache) - before)
    captures, capture_s = (a - b for a, b in zip(graph_captures(engine), captures_before))
    return {"pattern": pattern.name, "requests": len(ids), "wall_s": wall, "ttft_max_s": max(ttft.values()),
            "compiles": len(new), "kernels": new, "graph_captures": captures, "graph_capture_s": capture_s}


def graph_captures(engine) -> tuple[int, float]:
    """Decode CUDA graphs the engine captured so far, and the seconds they took (0.0 where a build does not
    count them)."""
    graphs = engine.runner.graphs
    return (graphs.captures, getattr(graphs, "capture_seconds", 0.0)) if graphs is not None else (0, 0.0)


def child(args: argparse.Namespace) -> None:
    """One build, in this process: its cache dir is already set (TRITON_CACHE_DIR) and empty."""
    import torch
    from random_models import block_shapes, random_delta
    from serve_bench_engine import build_engine, fill_slots, pinned
    from serve import model_path
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    t0 = time.perf_counter()
    path, _ = model_path(args)
    options = {"kernel_warmup": False} if args.label in args.no_warmup.split(",") else {}
    engine = build_engine(path, args.device, args.dtype, max_slots=args.tenants, num_kv_blocks=args.kv_blocks,
                          **options)
    built = time.perf_counter() - t0
    at_start = sorted(p.stem for p in compiled(cache))
    delta = pinned(random_delta(block_shapes(engine.base_shapes), engine.base_fingerprint, seed=1), engine.runner.device)
    fill_slots(engine, delta, args.tenants)
    rows = [play(engine, p, args.max_tokens, cache) for p in patterns(args.tenants)]
    captures, capture_s = graph_captures(engine)
    result = {"engine_build_s": built, "compiled_at_start": at_start, "rows": rows,
              "graph_captures_at_start": captures - sum(r["graph_captures"] for r in rows),
              "graph_capture_s_at_start": capture_s - sum(r["graph_capture_s"] for r in rows),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    Path(args.child_out).write_text(json.dumps(result, indent=1))


def run_build(args: argparse.Namespace, label: str, root: str | None, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"triton-{label}-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        if root:
            env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        child_out = out / f".first_use_{label}.json"
        cmd = [sys.executable, __file__, "--child-out", str(child_out), "--label", label, *sys.argv[1:]]
        subprocess.run(cmd, env=env, check=True)
        result = json.loads(child_out.read_text())
        child_out.unlink()
        print(f"{label}: {json.dumps(result)}", flush=True)
        return result


def write_report(args: argparse.Namespace, results: dict[str, dict], out: Path) -> None:
    labels = list(results)
    body = {"command": "python bench/first_use.py " + " ".join(sys.argv[1:]), "builds": results}
    (out / "first_use.json").write_text(json.dumps(body, indent=1) + "\n")
    head = "| request pattern | requests | " + " | ".join(
        f"{l}: wall ms | {l}: slowest TTFT ms | {l}: compiles | {l}: graph captures (ms)" for l in labels) + " |"
    lines = [f"# First-use latency ({next(iter(results.values()))['device']})", "",
             f"`{body['command']}`", "",
             "Each build in its own process with an empty Triton cache (a fresh machine); patterns run in order, "
             "each on an idle engine. compiles: Triton kernels compiled during the pattern; graph captures: decode "
             "CUDA graphs captured during it, and the time they took (a build that does not time them shows 0).", "",
             "Engine build, start-up kernel warm-up and graph captures included (s): " + ", ".join(
                 f"{l} {r['engine_build_s']:.1f} ({len(r['compiled_at_start'])} kernels compiled, "
                 f"{r['graph_captures_at_start']} graphs captured in {r['graph_capture_s_at_start']:.1f} s)"
                 for l, r in results.items()), "",
             head, "|---|---:|" + "---:|" * (4 * len(labels))]
    for i, row in enumerate(results[labels[0]]["rows"]):
        cells = []
        for l in labels:
            r = results[l]["rows"][i]
            cells += [f"{1e3 * r['wall_s']:,.0f}", f"{1e3 * r['ttft_max_s']:,.0f}", str(r["compiles"]),
                      f"{r['graph_captures']} ({1e3 * r['graph_capture_s']:,.0f})"]
        lines.append(f"| {row['pattern']} | {row['requests']} | " + " | ".join(cells) + " |")
    totals = ", ".join(f"{l} {sum(r['compiles'] for r in res['rows'])} compiles, "
                       f"{sum(r['wall_s'] for r in res['rows']):.1f} s" for l, res in results.items())
    lines += ["", f"All patterns: {totals}.", "", "Kernels compiled inside requests:", ""]
    for l, res in results.items():
        names = [f"{r['pattern']}: {', '.join(r['kernels'])}" for r in res["rows"] if r["kernels"]]
        lines += [f"- {l}: " + ("none" if not names else "; ".join(names))]
    lines.append("")
    (out / "first_use.md").write_text("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["pattern"] for r in results[labels[0]]["rows"]]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(labels)
    for k, l in enumerate(labels):
        ax.barh([i + k * width for i in range(len(names))], [r["wall_s"] for r in results[l]["rows"]], width, label=l)
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the pattern (s, log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "first_use.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama2-7b", "tiny"], default="llama2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve-bench"))
    ap.add_argument("--builds", default="", help="label=ROOT,... (default: this checkout, labelled 'this build')")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--no-warmup", default="", help="labels of builds run with EngineConfig(kernel_warmup=False)")
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="this build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_out:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    builds = dict(b.split("=", 1) for b in args.builds.split(",")) if args.builds else {"this build": None}
    write_report(args, {label: run_build(args, label, root, args.out) for label, root in builds.items()}, args.out)


if __name__ == "__main__":
    main()
