"""Autotune configs of the delta kernels (H100/H200), as functions so the interpreter gets one small config.

Keys are the weight shapes, the row-tile height and a power-of-two bucket of the row-tile count (the best
split depends on it), never the token count itself, so a new batch size rarely retunes and never recompiles.
Tiles along a quantized axis must fit inside one scale group (group_size is a multiple of 32): pruned below.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(names: tuple[str, str, str], rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, (a, b, c))), num_warps=w, num_stages=st) for a, b, c, w, st in rows]


# Decode is latency-bound before it is bandwidth-bound: a program walks d_in (or the ranks) one tile after
# another, each tile a chain of dependent loads, so few slots mean few programs and long chains. SPLIT
# cuts the walk into pieces run by separate programs that add their partial sums atomically (fp32).
def shrink_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_K input elements of V per step, d_in split SPLIT_K ways."""
    names = ("BLOCK_R", "BLOCK_K", "SPLIT_K")
    if _interpreting():
        return _configs(names, [(16, 32, 2, 4, 1)])
    return _configs(names, [(32, 128, 1, 4, 3), (32, 128, 4, 4, 3), (32, 128, 8, 4, 3), (16, 128, 8, 4, 3),
                            (64, 128, 4, 4, 3), (32, 64, 8, 4, 3), (16, 128, 16, 4, 3), (64, 128, 8, 8, 3)])


def expand_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_N output elements of U per step, rank blocks dealt out SPLIT_R ways."""
    names = ("BLOCK_R", "BLOCK_N", "SPLIT_R")
    if _interpreting():
        return _configs(names, [(16, 32, 2, 4, 1)])
    return _configs(names, [(32, 128, 1, 4, 3), (32, 128, 4, 4, 3), (32, 128, 8, 4, 3), (64, 128, 4, 8, 3),
                            (16, 128, 8, 4, 3), (32, 64, 4, 4, 3), (64, 64, 8, 4, 3), (32, 128, 16, 4, 3)])


def sign_configs() -> list[triton.Config]:
    """BLOCK_N output rows x BLOCK_K input elements of the sign matrix per step, d_in split SPLIT_K ways."""
    names = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
    if _interpreting():
        return _configs(names, [(16, 32, 2, 4, 1)])
    return _configs(names, [(64, 128, 1, 4, 3), (64, 128, 4, 4, 3), (64, 256, 4, 8, 3), (128, 128, 4, 8, 3),
                            (64, 128, 8, 4, 3), (32, 256, 8, 4, 3)])


def work_bucket(num_row_tiles: int) -> int:
    """Autotune key for how many row tiles (roughly, distinct slots) a launch has: the best SPLIT depends on
    it. Powers of two up to 64, so a new batch size rarely means a new tuning run."""
    return min(triton.next_power_of_2(max(num_row_tiles, 1)), 64)


def prune_to_group(axis: str):
    """Early-prune hook dropping configs whose tile along `axis` does not divide group_size."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        group_size = named_args["group_size"]
        return [c for c in configs if group_size % c.kwargs[axis] == 0]
    return prune


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
