"""Device memory the start-up decode graphs hold: a Llama-2-7B-shaped engine built with and without them.

Each variant runs in its own process (a second engine in one process inherits the first one's cached cuBLAS
workspaces and allocator state), so run the script once per variant:
    python bench/graph_memory.py --graphs off
    python bench/graph_memory.py --graphs on
Each prints one JSON line: memory a new allocation could take after the build (free on the device plus what torch's
allocator caches), torch's allocated and reserved bytes, and the graphs captured. The difference between the two
lines is what the base graphs cost (engine/decode_graphs.py: DecodeGraphs.capture_base).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltaserve.engine.decode_graphs import DecodeGraphs
from random_models import random_7b
from serve_bench_engine import build_engine, free_bytes, free_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", choices=["on", "off"], required=True, help="capture the base graphs at start-up")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve_bench"), help="keeps the random 7B")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    args = ap.parse_args()
    path = str(random_7b(args.work / "llama2-7b-random", "cuda"))
    free_device()
    if args.graphs == "off":
        DecodeGraphs.capture_base = lambda self: None
    dev = torch.device("cuda")
    start = time.perf_counter()
    engine = build_engine(path, "cuda", "float16", max_slots=64, num_kv_blocks=args.max_num_seqs * 7 + 1,
                          max_num_seqs=args.max_num_seqs, max_model_len=100, slot_bits_per_param=1.0)
    torch.cuda.synchronize(dev)
    print(json.dumps({"graphs": args.graphs, "build_s": round(time.perf_counter() - start, 1),
                      "free_after_build_gb": round(free_bytes(dev) / 1e9, 3),
                      "allocated_gb": round(torch.cuda.memory_allocated(dev) / 1e9, 3),
                      "reserved_gb": round(torch.cuda.memory_reserved(dev) / 1e9, 3),
                      "captures": engine.runner.graphs.captures, "device": torch.cuda.get_device_name(dev)}))


if __name__ == "__main__":
    main()
