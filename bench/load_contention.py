"""How long one delta load holds the engine's step thread, alone and beside a thread spinning in Python.

In the server the HTTP event loop, the step thread and the disk-read threads share one GIL. A load is thousands
of torch calls, each releasing the GIL, and a thread that gave it up waits up to the holder's switch interval to
get it back. The spinning thread stands in for those busy neighbours. Two ways to load, both timed on the side
that runs them:
- full: SlotBank.load on the step thread, from the host tier's copy (what a load that must grow a buffer does);
- planned: plan_load and write_planned (one batched copy from the host into the slot) on the loading thread,
  then only the commit of the slot's host state on the step thread.

Usage (the embedded SmolLM2, random ~1 bit/param Delta-CoMe-tiered delta):
    python bench/load_contention.py [--device cpu|cuda] [--model PATH] [--repeats 3] [--out DIR]
writes DIR/load_contention.json and .md (default bench/results).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from deltaserve.delta_store.checkpoint import default_model_path
from deltaserve.delta_store.format import write_delta
from deltaserve.delta_store.host_tier import read_pinned_delta
from deltaserve.engine import EngineConfig, LLMEngine
from serve_load import device_name
from random_models import random_delta

SWITCH_INTERVALS = (0.005, 0.001)   # Python's default; the server's (server/cli_serve.py)


@contextmanager
def spinning_neighbour(busy: bool) -> Iterator[None]:
    """A thread that holds the GIL whenever it can, as a busy event loop or parser thread does."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
    thread = threading.Thread(target=spin, daemon=True) if busy else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def one_load(engine: LLMEngine, delta, planned: bool) -> tuple[float, float]:
    """(seconds on the loading thread, seconds on the step thread) of one load into slot 1."""
    if not planned:
        step_s, _ = timed(lambda: engine.load_delta(1, delta))
        return 0.0, step_s
    plan_s, plan = timed(lambda: engine.plan_load(1, delta))
    write_s, _ = timed(lambda: engine.write_planned(plan))
    step_s, committed = timed(lambda: engine.runner.bank.commit_plan(plan))
    if not committed:
        raise RuntimeError("the plan went stale with nothing else loading")
    return plan_s + write_s, step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=None, help="the backbone (default: the embedded SmolLM2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)    # the neighbour and torch's own threads must not hide contention on a small CPU
    engine = LLMEngine(EngineConfig(str(args.model or default_model_path()), device=args.device, max_slots=2,
                                    num_kv_blocks=64))
    # As the host tier holds it: read from its file into one page-locked buffer (asynchronous copies on CUDA).
    fresh = random_delta(engine.base_shapes, engine.base_fingerprint, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_delta(Path(tmp) / "delta.safetensors", fresh.weights, fresh.metadata)
        delta = read_pinned_delta(path, expected_fingerprint=engine.base_fingerprint)
    engine.load_delta(0, delta)             # makes every buffer, so the planned loads never need to grow one
    pairs = len(engine.plan_load(1, delta).pairs)
    rows = []
    for interval in SWITCH_INTERVALS:
        sys.setswitchinterval(interval)
        for busy in (False, True):
            for planned in (False, True):
                with spinning_neighbour(busy):
                    times = [one_load(engine, delta, planned) for _ in range(args.repeats)]
                rows.append({"switch_interval_ms": interval * 1e3, "neighbour": "spinning" if busy else "none",
                             "load": "planned" if planned else "full",
                             "loader_s": statistics.median(t[0] for t in times),
                             "step_thread_s": statistics.median(t[1] for t in times)})
                print(rows[-1], flush=True)
    model = str(args.model) if args.model else "SmolLM2-135M-Instruct (embedded)"
    result = {"command": "python bench/load_contention.py " + " ".join(sys.argv[1:]), "device": device_name(args.device),
              "torch": torch.__version__, "model": model, "weights": len(delta.weights),
              "copy_pairs": pairs, "delta_bytes": sum(t.numel() * t.element_size() for w in delta.weights.values()
                                                      for t in w.tensors().values()),
              "repeats": args.repeats, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_contention.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Delta load time beside a busy thread: {result['device']}", "",
             f"`{result['command']}`; torch {result['torch']}; {result['model']}, one random delta of "
             f"{result['delta_bytes'] / 1e6:.1f} MB over {result['weights']} weight matrices ({pairs} copies). "
             f"Median of {args.repeats} loads. Loader = the thread that plans and writes the load; step thread = "
             "the part that runs between two decode steps, which every running request waits for.", "",
             "| switch interval | neighbour | load | loader s | step thread s |", "|---:|---|---|---:|---:|"]
    lines += [f"| {r['switch_interval_ms']:g} ms | {r['neighbour']} | {r['load']} | {r['loader_s']:.3f} | "
              f"{r['step_thread_s']:.3f} |" for r in rows]
    (args.out / "load_contention.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'load_contention.md'}")


if __name__ == "__main__":
    main()
