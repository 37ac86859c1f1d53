"""Autotune configs of the delta kernels (H100/H200), as functions so the interpreter gets one small config.

Keys are the weight shapes and the row-tile height, never the token count, so a new batch size does not
retune or recompile. Tiles along a quantized axis must fit inside one scale group (group_size is a multiple
of 32): pruned below.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(meta: tuple[str, str], rows: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({meta[0]: a, meta[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in rows]


def shrink_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_K input elements of V per step."""
    if _interpreting():
        return _configs(("BLOCK_R", "BLOCK_K"), [(16, 32, 4, 1)])
    return _configs(("BLOCK_R", "BLOCK_K"), [(16, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3),
                                             (32, 128, 8, 4), (16, 64, 4, 4), (64, 64, 4, 3)])


def expand_configs() -> list[triton.Config]:
    """BLOCK_R ranks x BLOCK_N output elements of U per step."""
    if _interpreting():
        return _configs(("BLOCK_R", "BLOCK_N"), [(16, 32, 4, 1)])
    return _configs(("BLOCK_R", "BLOCK_N"), [(32, 128, 4, 3), (64, 128, 8, 3), (16, 128, 4, 3), (32, 64, 4, 3),
                                             (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)])


def sign_configs() -> list[triton.Config]:
    """BLOCK_N output rows x BLOCK_K input elements of the sign matrix per step."""
    if _interpreting():
        return _configs(("BLOCK_N", "BLOCK_K"), [(16, 32, 4, 1)])
    return _configs(("BLOCK_N", "BLOCK_K"), [(64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (32, 256, 4, 3),
                                             (128, 256, 8, 4), (32, 128, 4, 4)])


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
