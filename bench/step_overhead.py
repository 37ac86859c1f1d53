"""Host overhead of one engine decode step, measured on CPU with a tiny random model whose compute is negligible.

With hidden size 64 the matmuls cost microseconds, so the step time is the Python and launch work that a GPU
step would also pay (on top of its ~1 ms of compute). Besides the time, each point counts the operations that
would stall a CUDA device: reads of a tensor's value on the host (.tolist/.item/bool/int, nonzero,
unique, boolean-mask indexing) and tensors made from host lists (a blocking copy unless pinned and
non_blocking). Tenants carry random packed Delta-CoMe deltas (bench/engine_decode.random_delta).

Usage: python bench/step_overhead.py [--layers 30] [--hidden 64] [--batches 1,16] [--tenants 0,4] [--steps 50]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from random_models import random_delta  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

# Tensor methods that hand a device value to the host (each one drains a CUDA stream).
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
               torch.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive, torch.masked_select}


class SyncCounter(TorchFunctionMode):
    """Counts torch calls (each at least one dispatch, most a kernel launch on a GPU) and, by call site (file:line
    of the engine code that made the call), the ones that would sync a device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.sites: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if self._would_sync(func, args, kwargs):
            frame = sys._getframe(1)
            while frame and ("torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
                frame = frame.f_back
            site = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame else "?"
            self.sites[site] = self.sites.get(site, 0) + 1
        return func(*args, **kwargs)

    @staticmethod
    def _would_sync(func, args: tuple, kwargs: dict) -> bool:
        if func in _HOST_READS:
            return True
        if func is torch.tensor:            # a list made straight into a device tensor: a blocking copy
            return kwargs.get("device") is not None and isinstance(args[0], (list, tuple))
        if func is torch.Tensor.__getitem__:   # boolean-mask indexing: its size depends on device values
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        return False


def measure(engine: LLMEngine, batch: int, tenants: int, steps: int, vocab: int) -> dict:
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch * 100 + tenants)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(0, vocab, (16,), generator=g).tolist(), params,
                           i % tenants if tenants else -1)
    started: set[str] = set()
    while len(started) < batch:                 # prefill until every request has its first token
        started.update(o.request_id for o in engine.step())
    engine.step()                               # one decode step outside the clock (first-use caches)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    ms, cpu_ms = ((time.perf_counter() - t0) / steps * 1e3, (time.process_time() - cpu0) / steps * 1e3)
    counter = SyncCounter()
    with counter:
        engine.step()
    for i in range(batch):
        engine.abort(f"r{i}")
    # CPU time is steadier than wall time on a shared machine; torch calls and syncs are exact counts.
    return {"batch": batch, "tenants": tenants, "ms_per_step": round(ms, 2), "cpu_ms_per_step": round(cpu_ms, 2),
            "torch_calls_per_step": counter.calls, "syncs_per_step": sum(counter.sites.values()),
            "sync_sites": dict(sorted(counter.sites.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tenants", default="0,4")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tenants = [int(t) for t in args.tenants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "base", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_hidden_layers=args.layers)
        # Generous slot capacity: the random deltas' fixed tiers are large next to hidden 64 matrices.
        engine = LLMEngine(EngineConfig(str(base), max_slots=max(max(tenants), 1), slot_bits_per_param=32,
                                        num_kv_blocks=256, max_model_len=256))
        for slot in range(max(tenants)):
            engine.load_delta(slot, random_delta(engine.base_shapes, engine.base_fingerprint, seed=slot))
        vocab = engine.runner.model.config.vocab_size
        for b in (int(x) for x in args.batches.split(",")):
            for t in tenants:
                if t <= b:
                    print(json.dumps(measure(engine, b, t, args.steps, vocab)), flush=True)


if __name__ == "__main__":
    main()
