"""Autotune configs of the delta kernels (H100/H200), as functions so the interpreter gets one small config.

Keys are the weight shapes, the row-tile height and a power-of-two bucket of the row-tile count (the best
split depends on it), never the token count itself, so a new batch size rarely retunes and never recompiles.
Tiles along a quantized axis must fit inside one scale group (group_size is a multiple of 32): pruned below.
Each config also names its bit-plane unpacking strategy (UNPACK, kernels/bitplanes.py); forced_unpack runs
one strategy alone, for tests and benchmarks.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from .bitplanes import UNPACK_NAMES


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Config rows: (three tile sizes, UNPACK strategy name, num_warps, num_stages).
def _configs(names: tuple[str, str, str], rows: list[tuple[int, int, int, str, int, int]]) -> list[triton.Config]:
    return [triton.Config({**dict(zip(names, (a, b, c))), "UNPACK": UNPACK_NAMES.index(u)}, num_warps=w,
                          num_stages=st) for a, b, c, u, w, st in rows]


def _interpreter_rows(a: int, b: int, c: int) -> list[tuple[int, int, int, str, int, int]]:
    """One small config per strategy: forced_unpack picks one (the first by default), so none is timed."""
    return [(a, b, c, u, 4, 1) for u in UNPACK_NAMES]


# Decode is latency-bound before it is bandwidth-bound: a program walks d_in (or the ranks) one tile after
# another, each tile a chain of dependent loads, so few slots mean few programs and long chains. SPLIT
# cuts the walk into pieces run by separate programs that add their partial sums atomically (fp32).
def shrink_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_K input elements of V per step, d_in split SPLIT_K ways."""
    names = ("BLOCK_R", "BLOCK_K", "SPLIT_K")
    if _interpreting():
        return _configs(names, _interpreter_rows(16, 32, 2))
    return _configs(names, [
        (32, 128, 1, "planes", 4, 3), (32, 128, 4, "planes", 4, 3), (32, 128, 8, "planes", 4, 3),
        (16, 128, 8, "planes", 4, 3), (64, 128, 4, "planes", 4, 3), (32, 64, 8, "planes", 4, 3),
        (16, 128, 16, "planes", 4, 3), (64, 128, 8, "planes", 8, 3),
        (16, 64, 8, "pairs", 4, 4), (32, 64, 8, "pairs", 4, 3), (16, 128, 8, "pairs", 4, 3),
        (32, 128, 4, "pairs", 4, 3), (32, 128, 8, "pairs", 8, 3), (64, 128, 4, "pairs", 8, 3)])


def expand_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_N output elements of U per step, rank blocks dealt out SPLIT_R ways."""
    names = ("BLOCK_R", "BLOCK_N", "SPLIT_R")
    if _interpreting():
        return _configs(names, _interpreter_rows(16, 32, 2))
    return _configs(names, [
        (32, 128, 1, "planes", 4, 3), (32, 128, 4, "planes", 4, 3), (32, 128, 8, "planes", 4, 3),
        (64, 128, 4, "planes", 8, 3), (16, 128, 8, "planes", 4, 3), (32, 64, 4, "planes", 4, 3),
        (64, 64, 8, "planes", 4, 3), (32, 128, 16, "planes", 4, 3),
        (16, 64, 8, "pairs", 4, 4), (32, 64, 4, "pairs", 4, 3), (16, 128, 8, "pairs", 4, 3),
        (32, 128, 4, "pairs", 4, 3), (32, 128, 8, "pairs", 8, 3), (64, 128, 4, "pairs", 8, 3)])


def sign_configs() -> list[triton.Config]:
    """BLOCK_N output rows x BLOCK_K input elements of the sign matrix per step, d_in split SPLIT_K ways."""
    names = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
    if _interpreting():
        return _configs(names, _interpreter_rows(16, 32, 2))
    return _configs(names, [
        (64, 128, 1, "planes", 4, 3), (64, 128, 4, "planes", 4, 3), (64, 256, 4, "planes", 8, 3),
        (128, 128, 4, "planes", 8, 3), (64, 128, 8, "planes", 4, 3), (32, 256, 8, "planes", 4, 3),
        (32, 128, 8, "pairs", 4, 3), (64, 128, 4, "pairs", 4, 3), (64, 256, 4, "pairs", 8, 3)])


def work_bucket(num_row_tiles: int) -> int:
    """Autotune key for how many row tiles (roughly, distinct slots) a launch has: the best SPLIT depends on
    it. Powers of two up to 64, so a new batch size rarely means a new tuning run."""
    return min(triton.next_power_of_2(max(num_row_tiles, 1)), 64)


# The strategy forced_unpack holds (None: the autotuner chooses among all). The interpreter times nothing,
# so it always runs one: the first unless a test forces another.
_forced: list[str | None] = [UNPACK_NAMES[0] if _interpreting() else None]
_tuned: list[triton.runtime.Autotuner] = []


def autotune(**kwargs) -> Callable:
    """triton.autotune for a delta kernel: its choice is forgotten when forced_unpack changes the configs, and a
    config the compiler rejects is skipped (timed as infinite, with a warning) instead of failing the call."""
    def wrap(fn):
        tuned = triton.autotune(**kwargs)(fn)
        tuned._bench = _skipping_rejected(tuned._bench, fn.__name__)
        _tuned.append(tuned)
        return tuned
    return wrap


def _skipping_rejected(bench: Callable, kernel: str) -> Callable:
    """Triton's autotuner skips configs that run out of resources but lets a failed compiler pass through (seen on
    the H100 with triton 3.6: "PassManager::run failed" in make_ttgir for one expand config of the 7B shapes)."""
    def run(*args, config: triton.Config, **meta):
        try:
            return bench(*args, config=config, **meta)
        except RuntimeError as e:
            if "PassManager::run failed" not in str(e):
                raise
            warnings.warn(f"{kernel}: config {config} does not compile here ({e}); tuning goes on without it")
            return [float("inf")] * 3
    return run


@contextmanager
def forced_unpack(strategy: str) -> Iterator[None]:
    """Within this block every delta kernel runs only configs of `strategy` (one of UNPACK_NAMES)."""
    if strategy not in UNPACK_NAMES:
        raise ValueError(f"unknown unpack strategy {strategy!r}, expected one of {UNPACK_NAMES}")
    previous = _forced[0]
    _set_forced(strategy)
    try:
        yield
    finally:
        _set_forced(previous)


def _set_forced(strategy: str | None) -> None:
    _forced[0] = strategy
    for kernel in _tuned:
        kernel.cache.clear()


def prune(group_axis: str | None = None, pairs_below_block_m: int | None = None):
    """Early-prune hook keeping the forced strategy's configs and, with group_axis, only configs whose tile along
    that axis divides group_size (a tile never spans two scale groups). A group size that no tuned tile divides
    (32, or 96) gets the configs with that tile cut to the largest power of two dividing it (>= 32: the group
    size is a multiple of 32), so every valid delta file runs.
    pairs_below_block_m drops UNPACK_PAIRS configs at row tiles of that height or more: triton 3.6 rejects all of
    them in the expand kernel at BLOCK_M 64 on the H100 ("Illegal shared layout" in TritonGPUOptimizeDotOperands),
    and each failed compile costs seconds on every new tuning key. A forced "pairs" then runs the planes configs."""
    def keep(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if pairs_below_block_m is not None and kwargs.get("BLOCK_M", 0) >= pairs_below_block_m:
            configs = [c for c in configs if c.kwargs["UNPACK"] != UNPACK_NAMES.index("pairs")]
        if _forced[0] is not None:
            configs = [c for c in configs if c.kwargs["UNPACK"] == UNPACK_NAMES.index(_forced[0])] or configs
        if group_axis is not None:
            group_size = named_args["group_size"]
            fitting = [c for c in configs if group_size % c.kwargs[group_axis] == 0]
            configs = fitting or _with_tile(configs, group_axis, group_size & -group_size)
        return configs
    return keep


def _with_tile(configs: list[triton.Config], axis: str, tile: int) -> list[triton.Config]:
    """configs with their `axis` tile cut to at most `tile`, duplicates dropped."""
    out, seen = [], set()
    for c in configs:
        kwargs = {**c.kwargs, axis: min(c.kwargs[axis], tile)}
        key = (tuple(sorted(kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def block_m_for(max_seg_len: int) -> int:
    """Row-tile height: the smallest tl.dot-able tile holding a whole segment, so rows sharing a slot read its
    bytes once, up to 64 (prefill segments then take several tiles, re-reading the slot from L2)."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(x_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of tl.dot for activations of x_dtype: the activation dtype itself (the centred codes and
    +-1 signs are exact in it). Triton's CPU interpreter multiplies bf16 operands as raw integers (seen with
    triton 3.9), so there they go as fp32, which holds every bf16 value exactly."""
    if _interpreting() and x_dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[x_dtype]
