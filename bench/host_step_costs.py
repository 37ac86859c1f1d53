"""Host time of two per-step pieces of a decode step, on the CPU (time the GPU waits between two graph replays).

1. DecodeAttention.build (engine/attention.py): a decode step's positions, slot mapping, [P, max_blocks] block
   table and context lengths, made on the host and uploaded, for batch x max_blocks (max_model_len / block size).
2. Detokenizer.add per generated token (engine/detokenizer.py), through TextDecoder and through transformers'
   tokenizer.decode wrapper, on the tests' byte-level BPE tokenizer.
Best of --repeats runs each. Writes host_step_costs.json and .md under --out.

Usage: python bench/host_step_costs.py [--out bench/results] [--label NAME] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parents[1] / "tests")]
from tiny_models import make_tokenizer  # noqa: E402

from deltaserve.engine.attention import DecodeAttention  # noqa: E402
from deltaserve.engine.detokenizer import Detokenizer, TextDecoder  # noqa: E402

BUILD_CASES = [(64, 8, 100), (128, 32, 400), (128, 256, 600), (128, 256, 2000)]   # batch, max_blocks, context


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def build_costs(repeats: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for batch, max_blocks, ctx in BUILD_CASES:
        tables = [[rng.randrange(100_000) for _ in range(-(-ctx // 16))] for _ in range(batch)]
        lens = [ctx] * batch
        s = best_of(lambda: DecodeAttention.build(lens, tables, 16, batch, max_blocks, 0, torch.device("cpu")),
                    repeats)
        rows.append(dict(batch=batch, max_blocks=max_blocks, context=ctx, ms=round(s * 1e3, 3)))
    return rows


def detokenize_costs(repeats: int, tokens: int = 2000) -> list[dict]:
    tokenizer = make_tokenizer()
    wrapper = lambda ids, skip_special_tokens=False: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)  # noqa: E731
    rows = []
    for name, decode in (("transformers tokenizer.decode", wrapper), ("TextDecoder", TextDecoder(tokenizer))):
        def run() -> None:
            d = Detokenizer(decode, list(range(5, 40)), [])
            for i in range(tokens):
                d.add(5 + i % 300, False)
        rows.append(dict(decoder=name, us_per_token=round(best_of(run, max(3, repeats // 6)) / tokens * 1e6, 2)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--label", default="", help="suffix of the output files (host_step_costs_LABEL.*)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = dict(machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
                  python=platform.python_version(), torch=torch.__version__, build=build_costs(args.repeats),
                  detokenize=detokenize_costs(args.repeats))
    stem = args.out / f"host_step_costs{'_' + args.label if args.label else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Host time of decode-step pieces (CPU: {result['machine']}, Python {result['python']}, torch "
             f"{result['torch']})", "", f"Command: `python bench/host_step_costs.py{' --label ' + args.label if args.label else ''}`"
             f" (best of {args.repeats})", "", "| batch | max_blocks | context | DecodeAttention.build ms |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['max_blocks']} | {r['context']} | {r['ms']} |" for r in result["build"]]
    lines += ["", "| decoder | Detokenizer.add us a token |", "|---|---:|"]
    lines += [f"| {r['decoder']} | {r['us_per_token']} |" for r in result["detokenize"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
