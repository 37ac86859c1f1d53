"""The activations of the shrink and sign decode kernels as 24-bit fixed point: per row and per group of group_size
elements (the shrink: V's scale groups; the sign kernel: its k tiles), scale = absmax / (2^23 - 1) and
q = round(x / scale), split into three bytes, a signed top one and two unsigned (q = 65536 * b2 + 256 * b1 + b0).

Why: those kernels (kernels/bitserial.fixed_point_range_dots) multiply bit-plane codes by x on the CUDA cores. With
x in bytes, four elements of a plane meet four bytes of x in one IDP.4A (dp4a), three for the three bytes, instead
of four predicated fp32 adds. Why 24 bits: q's rounding (at most absmax * 2^-24) is that of fp32 at the group's
largest element, so the kernels match the exact product to fp32 precision, as the fp32 loop they replaced did.
Fewer bits changed results measurably on the CPU: 16 (absmax / 65534, finer than fp16's own rounding) moved z by
6e-5 of its norm, which summed terms that cancel turned into 2-ulp bf16 errors of the kernel test's outputs; 8 bits
changed the engine's greedy tokens against the merged model (tests/test_engine.py).
A tile lies in one group: its integer sums take x's scale (and V's group scale) once.

Layout (what quantize_rows writes): a row is ceil(d / 32) blocks of 24 int32 words. Word j < 8 of a block holds the
top bytes of elements j, j + 8, j + 16, j + 24 of the block's 32 (byte i: element 8 i + j), word 8 + j their middle
bytes and word 16 + j their low bytes. The same four elements are the bits j, j + 8, j + 16, j + 24 of a bit-plane
word, which (word >> j) & 0x01010101 lays out as bytes for dp4a. After the blocks come three words a block: the
sums over its 32 elements of the top (signed), middle and low (unsigned) bytes, which take the codes' centre off
(kernels/bitserial.py) without a dp4a of their own.

The launch also zeroes the caller's fp32 outputs, whose partial sums arrive atomically (the low-rank delta's z and
its expand workspace, the sign kernel's workspace): one launch for all, as every launch is a node of each captured
decode graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deltaserve.delta_store.packing import num_groups, num_words

QMAX = 2**23 - 1
WORDS_PER_BLOCK = tl.constexpr(24)  # int32 words of quantize_rows' output per 32 elements: 8 for each byte of q
SUMS_PER_BLOCK = tl.constexpr(3)  # then, after every block's words, its three byte sums


@dataclass(frozen=True)
class QuantizedRows:
    """quantize_rows' output: words int32 [B, 27 * ceil(d / 32)] in the layout above (q = 0 past d: the byte
    words, then the byte sums) and scales fp32 [B, ceil(d / group_size)]."""
    words: torch.Tensor
    scales: torch.Tensor


# The zeroed width (a plan's sum of rank caps, and more) is no specialization key: engine/kernel_warmup.py compiles
# this kernel with small synthetic ranks, and a request must not compile it again.
@triton.jit(do_not_specialize=["zero_width", "stride_zero"])
def _quantize_rows_kernel(x_ptr, q_ptr, scales_ptr, zero_ptr, d, zero_width, group_size, stride_xm, stride_qm,
                          stride_sm, stride_zero, BLOCK_G: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Program (row, group): quantizes one group of one row into bytes at q_ptr (int8, stride_qm bytes a row); the
    row's group-0 program also zeroes that row of the caller's outputs at zero_ptr."""
    row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
    k = grp * group_size + tl.arange(0, BLOCK_G)
    in_group = tl.arange(0, BLOCK_G) < group_size
    x = tl.load(x_ptr + row * stride_xm + k, mask=in_group & (k < d), other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 8388607.0)
    # x / scale rounds in fp32, so the group's absmax may land on 2^23: clamped, as q's top byte must fit int8
    q = tl.where(scale > 0, tl.floor(tl.math.div_rn(x, tl.maximum(scale, 1e-30)) + 0.5), 0.0)
    q = tl.minimum(tl.maximum(q, -8388607.0), 8388607.0).to(tl.int32)
    # element k's top byte: block k // 32 (of 4 * WORDS_PER_BLOCK bytes), word k % 8, byte (k % 32) // 8; the middle
    # one 32 bytes on, the low one 64. Bytes are stored as the int8 of the same bits.
    at = q_ptr + row * stride_qm + (k // 32) * (4 * WORDS_PER_BLOCK) + (k % 8) * 4 + (k % 32) // 8
    ok = in_group & (k < tl.cdiv(d, 32) * 32)
    # The group's blocks' byte sums go after the row's blocks (group_size is a multiple of 32: a block lies in one
    # group)
    blocks = grp * (group_size // 32) + tl.arange(0, BLOCK_G // 32)
    n_blocks = tl.cdiv(d, 32)
    row_words = (q_ptr + row * stride_qm).to(tl.pointer_type(tl.int32))
    sums = row_words + WORDS_PER_BLOCK * n_blocks + SUMS_PER_BLOCK * blocks
    sums_ok = (tl.arange(0, BLOCK_G // 32) < group_size // 32) & (blocks < n_blocks)
    for i in tl.static_range(3):
        byte = q >> (16 - 8 * i)  # the top byte by arithmetic shift: floor(q / 65536), in [-128, 127]
        if i > 0:
            byte = byte & 0xFF
        tl.store(at + 32 * i, tl.where(byte > 127, byte - 256, byte).to(tl.int8), mask=ok)  # as int8 of its bits
        tl.store(sums + i, tl.sum(tl.reshape(byte, (BLOCK_G // 32, 32)), axis=1), mask=sums_ok)
    tl.store(scales_ptr + row * stride_sm + grp, scale)
    if grp == 0:
        for c in range(0, zero_width, BLOCK_Z):
            cols = c + tl.arange(0, BLOCK_Z)
            tl.store(zero_ptr + row * stride_zero + cols, tl.zeros((BLOCK_Z,), dtype=tl.float32),
                     mask=cols < zero_width)


def quantize_rows(x: torch.Tensor, group_size: int, zero: torch.Tensor | None = None) -> QuantizedRows:
    """x [B, d] fp16/bf16/fp32 -> its QuantizedRows, in one Triton launch, which also zeroes `zero` (fp32 [B, w],
    rows with any stride, columns contiguous: the caller's outputs whose partial sums arrive atomically)."""
    b, d = x.shape
    words = torch.empty(b, (WORDS_PER_BLOCK.value + SUMS_PER_BLOCK.value) * num_words(d), dtype=torch.int32,
                        device=x.device)
    scales = torch.empty(b, num_groups(d, group_size), dtype=torch.float32, device=x.device)
    if zero is None:
        zero = torch.empty(b, 0, dtype=torch.float32, device=x.device)
    if zero.shape[0] != b or zero.dtype != torch.float32 or (zero.shape[1] > 1 and zero.stride(1) != 1):
        raise ValueError(f"zero: expected fp32 [{b}, w] with contiguous columns, got {zero.dtype} "
                         f"{tuple(zero.shape)} strides {zero.stride()}")
    if b and d:
        q = words.view(torch.int8)
        _quantize_rows_kernel[(b, scales.shape[1])](
            x, q, scales, zero, d, zero.shape[1], group_size, x.stride(0), q.stride(0), scales.stride(0),
            max(zero.stride(0), 1), BLOCK_G=triton.next_power_of_2(group_size), BLOCK_Z=256)
    return QuantizedRows(words, scales)


def quantize_rows_reference(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch quantize_rows in element order: (q int32 [B, d], |q| <= 2^23 - 1, scales fp32 [B, groups])."""
    b, d = x.shape
    groups = num_groups(d, group_size)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group_size - d)).view(b, groups, group_size)
    scales = padded.abs().amax(dim=2) / QMAX
    q = torch.where(scales[..., None] > 0, torch.floor(padded / scales.clamp_min(1e-30)[..., None] + 0.5), 0.0)
    q = q.clamp(-QMAX, QMAX)
    return q.view(b, -1)[:, :d].to(torch.int32), scales
