"""Engine helpers of bench/serve.py: build and free engines, fill slots, time decode steps, copy bandwidth."""
from __future__ import annotations

import gc
import time

import torch

from deltaserve.delta_store.format import DeltaFile, weight_bytes
from deltaserve.delta_store.host_tier import map_tensors
from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams

GiB = 1 << 30
# Tokens a request may decode while later requests of its batch still prefill (chunks of 2048 tokens: up to
# 4 steps at batch 128 x 64-token prompts). Without them the first requests finished inside the timed steps,
# the batch shrank to a new graph bucket, and its capture was timed (serve.log of 2026-11-23).
DECODE_SLACK = 16


def build_engine(model: str, device: str, dtype: str, **options) -> LLMEngine:
    """An engine of EngineConfig(model, device, dtype, **options)."""
    return LLMEngine(EngineConfig(model, device=device, dtype=dtype, **options))


def free_device() -> None:
    """After the caller dropped its last engine reference: return the engine's memory to the device."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int:
    """Device memory a new allocation can take: free on the device plus what torch's allocator caches."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def stored_bytes(delta: DeltaFile) -> int:
    """Every stored byte of a delta file's weights: what one slot holds of it."""
    return sum(weight_bytes(w) for w in delta.weights.values())


def pinned(delta: DeltaFile, device: torch.device) -> DeltaFile:
    """`delta` in page-locked host memory (CUDA), so filling a slot is one fast DMA per tensor."""
    return map_tensors(delta, lambda t: t.pin_memory()) if device.type == "cuda" else delta


def fill_slots(engine: LLMEngine, delta: DeltaFile, slots: int) -> float:
    """Load the same delta file into slots 0..slots-1 (each slot holds its own copy); returns seconds."""
    t0 = time.perf_counter()
    for slot in range(slots):
        engine.load_delta(slot, delta)
    sync(engine.runner.device)
    return time.perf_counter() - t0


def mix(batch: int, tenants: int) -> list[int]:
    """Row slots of a batch of `batch` rows over `tenants` slots: row i on slot i % tenants (0 tenants: base)."""
    return [i % tenants if tenants else -1 for i in range(batch)]


def step_time(engine: LLMEngine, row_slots: list[int], warmup: int, steps: int, prompt_len: int) -> float:
    """Seconds per decode step of one request per entry of `row_slots` (its slot, -1 = base). Like
    engine_decode.decode_rate, but the warm-up steps (Triton autotuning, CUDA-graph capture) run inside the
    same requests, so the prefill is paid once; the clock covers the `steps` timed decode steps only."""
    batch = len(row_slots)
    g = torch.Generator().manual_seed(batch * 1000 + len(set(row_slots)))
    params = SamplingParams(max_tokens=warmup + steps + DECODE_SLACK, temperature=0, ignore_eos=True)
    ids = [f"r{i}" for i in range(batch)]
    for rid, slot in zip(ids, row_slots):
        engine.add_request(rid, torch.randint(0, engine.vocab_size, (prompt_len,), generator=g).tolist(), params,
                           slot)
    started: set[str] = set()
    while len(started) < batch:                 # prefill (chunked) until every request has its first token
        started.update(o.request_id for o in engine.step())
    for _ in range(warmup):
        engine.step()
    sync(engine.runner.device)
    captures = graph_captures(engine)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.runner.device)
    elapsed = time.perf_counter() - t0
    if graph_captures(engine) != captures:  # the warm-up did not reach the steady state: say so in the log
        print(f"warning: {graph_captures(engine) - captures} CUDA graph capture(s) inside the timed steps of "
              f"batch {batch}, slots {sorted(set(row_slots))[:8]}", flush=True)
    for rid in ids:
        engine.abort(rid)
    return elapsed / steps


def graph_captures(engine: LLMEngine) -> int:
    """Decode graphs the engine has captured so far (0 without graphs)."""
    return engine.runner.graphs.captures if engine.runner.graphs is not None else 0


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """K and V of one token in every layer."""
    return engine.runner.block_bytes // engine.config.block_size


def copy_bandwidth(device: torch.device, nbytes: int = GiB) -> float:
    """Bytes/s of a device-to-device copy of `nbytes`, counting bytes read plus bytes written (the convention
    of bench/kernel_bench.py); median of 20 copies after 5 warm-ups, CUDA events on CUDA."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 5:
            times.append(seconds)
    del src, dst
    free_device()
    return 2 * nbytes / sorted(times)[len(times) // 2]
