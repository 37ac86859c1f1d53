"""Engine decode throughput: tokens/s at batch sizes x distinct tenants, deltas ~1 bit/param (Delta-CoMe tiers).

Models: the embedded SmolLM2-135M, or a random model with Llama-2-7B shapes written once to --work (random
values: the time depends on shapes, not values). Tenant deltas are random packed low-rank deltas with the
Delta-CoMe tiering (2 ranks at 8 bits, 32 at 3, the rest at 2 up to 1 bit/param, every scale counted), for
every weight matrix including embeddings. Each row of a batch of B uses tenant (row % T); T = 0 is the base.
The clock covers decode steps only, after every request's prefill.

Usage: python bench/engine_decode.py --model smollm2|llama2-7b [--device cuda] [--dtype bfloat16]
           [--batches 1,64] [--tenants 0,1,16] [--steps 32] [--prompt-len 128] [--out bench/results]
           [--profile 1x0,64x1]  (the torch profiler's table of device time by op, for each batch x tenants)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from deltaserve.delta_store.checkpoint import default_model_path
from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams
from random_models import random_7b, random_delta


def decode_rate(engine: LLMEngine, batch: int, tenants: int, steps: int, prompt_len: int, vocab: int,
                profile: Path | None = None) -> float:
    """Decode tokens/s of `batch` requests spread over `tenants` slots; with `profile`, the decode steps run
    under the torch profiler and its table of ops by device time is written there."""
    g = torch.Generator().manual_seed(batch * 1000 + tenants)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, params, i % tenants if tenants else -1)
    started: set[str] = set()
    while len(started) < batch:                 # prefill (chunked) until every request has its first token
        started.update(o.request_id for o in engine.step())
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    sync()
    with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        elapsed = time.perf_counter() - t0
    if profile:
        sort = "cuda_time_total" if engine.runner.device.type == "cuda" else "cpu_time_total"
        profile.write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    for i in range(batch):
        engine.abort(f"r{i}")
    return batch * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "llama2-7b"], default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--tenants", default="0,1,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve_bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (the eager step, for comparison)")
    ap.add_argument("--profile", default="", help="batch x tenants points to profile after the timed ones (each: "
                    "engine_profile_{model}_{B}x{T}.txt, ops by device time)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tenants = [int(t) for t in args.tenants.split(",")]
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    path = default_model_path() if args.model == "smollm2" else random_7b(args.work / "llama2-7b-random", args.device)
    engine = LLMEngine(EngineConfig(str(path), device=args.device, dtype=dtype, max_slots=max(max(tenants), 1),
                                    max_num_seqs=max(batches), max_model_len=args.prompt_len + args.steps + 8,
                                    cuda_graphs=False if args.eager else None, exact_graph_after=1))
    for slot in range(max(tenants)):
        engine.load_delta(slot, random_delta(engine.base_shapes, engine.base_fingerprint, seed=slot))
    vocab = engine.runner.model.config.vocab_size
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in batches:
        for t in tenants:
            if t <= b:
                decode_rate(engine, b, t, 4, args.prompt_len, vocab)   # warm-up: kernel tuning for this mix
                rate = decode_rate(engine, b, t, args.steps, args.prompt_len, vocab)
                rows.append({"batch": b, "tenants": t, "decode_tok_s": round(rate, 1)})
                print(json.dumps(rows[-1]), flush=True)
                write_results(args, engine, dtype, rows)   # after every point: a run cut short keeps its points
    for point in filter(None, args.profile.split(",")):
        b, t = (int(n) for n in point.split("x"))
        decode_rate(engine, b, t, 4, args.prompt_len, vocab)   # warm-up: this mix's graph, outside the profile
        decode_rate(engine, b, t, 8, args.prompt_len, vocab, profile=args.out / f"engine_profile_{args.model}_{point}.txt")


def write_results(args: argparse.Namespace, engine: LLMEngine, dtype: str, rows: list[dict]) -> None:
    """engine_decode_{graphs|eager}_{model}.json and .md under args.out."""
    stats = engine.stats()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    graphs = engine.runner.graphs is not None and engine.runner.device.type == "cuda"  # on CPU: uncaptured
    result = {"model": args.model, "device": device, "dtype": dtype, "cuda_graphs": graphs, "steps": args.steps,
              "prompt_len": args.prompt_len, "kv_blocks": stats.kv_blocks_total,
              "delta_slot_bytes": stats.delta_slot_bytes, "backbone_bytes": stats.backbone_bytes, "rows": rows}
    stem = args.out / f"engine_decode_{'graphs' if graphs else 'eager'}_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Engine decode, {args.model} on {device} ({dtype}, {'CUDA graphs' if graphs else 'eager'})", "",
             "| batch | tenants | decode tok/s |", "|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['tenants']} | {r['decode_tok_s']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
