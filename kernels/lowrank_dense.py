"""Dense path of long segments: a tenant with many rows in one call (a prefill chunk) gets its factors dequantized
to the activation dtype once, then cuBLAS applies them with two GEMMs.

The tl.dot kernels unpack a slot's bit planes again for every row tile, and move the unpacked tile through shared
memory (ncu on the H100, bench/results/kernel_profile_ncu.txt: L1/shared-memory throughput 84%, DRAM 6%), so a
2048-row prefill of one tenant took 10x the backbone matmul of the same layer. Dequantizing once writes the
factors at 16 bits an element (8x their 2-bit codes) and a GEMM reads them back; that pays for itself from a few
hundred rows of one tenant on (DENSE_MIN_ROWS), as quantized-model servers switch to dequantize-then-GEMM for
large batches.

Layout (lowrank_plan.dense_rows): V [width, d_in] and U [width, max d_out] of one slot, a tier's rank r at row
T_DENSE_ROW + r, each projection's rows starting at a multiple of DENSE_ALIGN; V's rows carry s * scale, rows past
the slot's rank in a tier, and the padding rows, are zero. z = x @ V^T for every projection at once (they share
x), then y[:, projection] += z[:, its rows] @ U[its rows, :d_out], fp32 accumulation and one rounding into y, as
the references do. The factors and z take the activation dtype: the delta comes out within 7e-4 (fp16) and 1e-2
(bf16) relative error of the reference's (tests/test_kernels.py), against 4e-4 and 1.4e-3 for the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitplanes import UNPACK_NAMES, tile_offsets, unpack_centred
from .lowrank_plan import (T_D_OUT, T_DENSE_ROW, T_RANK_CAP, T_S, T_U_PLANES, T_U_SCALES, T_V_PLANES, T_V_SCALES,
                           TIER_COLS, LowRankPlan, dense_rows, tier_factor)
from .slots import LowRankProjection

# Rows of one tenant in one call from which the dense path replaces the kernels. On the H100 (kernel_bench,
# 4096 -> 4096; bench/results/kernel_ab_dense_path.md) the dense path is 5.1x faster at 2048 rows, 3.1x at 512,
# and 3% at 128 (break-even: not worth its coarser bf16 rounding there).
DENSE_MIN_ROWS = 256
# The dequantize kernel's launch: ranks a program, bit-plane unpacking (kernels/bitplanes.py), warps. The fastest
# of bench/dequant_variants.py's candidates on the H100 (bench/results/dequant_variants.md): 1.5-1.7x faster than
# 32 ranks and 4 warps, 30-40% of copy bandwidth on the bytes it moves.
DEQUANT_CONFIG = {"BLOCK_R": 16, "UNPACK": UNPACK_NAMES.index("planes"), "num_warps": 2}


@triton.jit(do_not_specialize=["slot"])
def _dequantize_kernel(v_ptr, u_ptr, tiers_ptr, slot, d_in, group_size, stride_v, stride_u,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UNPACK: tl.constexpr):
    """Grid (tier, rank block, 2 x column block): the first half of axis 2 writes V's columns, the second U's."""
    tier, pid_r = tl.program_id(0), tl.program_id(1)
    n_d = tl.num_programs(2) // 2
    is_u = tl.program_id(2) >= n_d
    d0 = (tl.program_id(2) % n_d) * BLOCK_D
    desc = tiers_ptr + tier * TIER_COLS
    rank_cap = tl.load(desc + T_RANK_CAP).to(tl.int32)
    d = tl.where(is_u, tl.load(desc + T_D_OUT).to(tl.int32), d_in)
    r0 = pid_r * BLOCK_R
    if (r0 >= rank_cap) | (d0 >= d):  # the grid covers the largest tier and the widest factor
        return
    if is_u:
        rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(desc, slot, d, group_size,
                                                                                   T_U_PLANES, T_U_SCALES)
    else:
        rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(desc, slot, d, group_size,
                                                                                   T_V_PLANES, T_V_SCALES)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    q2 = unpack_centred(planes, plane_stride, n_words, offs_r, r_mask, d0 // 32, n_words, nbits, tl.float32,
                        BLOCK_R, BLOCK_D, UNPACK)  # [R, D] 2 * (code - centre) of columns d0 + tile_offsets
    scale = 0.5 * tl.load(scales + offs_r * n_groups + d0 // group_size, mask=r_mask, other=0.0).to(tl.float32)
    s_ptr = tl.load(desc + T_S).to(tl.pointer_type(tl.float32))
    s = tl.load(s_ptr + slot.to(tl.int64) * rank_cap + offs_r, mask=r_mask, other=0.0)
    scale *= tl.where(is_u, 1.0, s)  # V's rows carry s
    value = tl.where(r_mask[:, None], q2 * scale[:, None], 0.0)  # ranks past the slot's: exact zeros
    rows = (tl.load(desc + T_DENSE_ROW).to(tl.int32) + offs_r)[:, None]
    offs_d = d0 + tile_offsets(BLOCK_D, UNPACK)
    mask = (offs_r < rank_cap)[:, None] & (offs_d < d)[None, :]
    if is_u:
        tl.store(u_ptr + rows * stride_u + offs_d[None, :], value.to(u_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(v_ptr + rows * stride_v + offs_d[None, :], value.to(v_ptr.dtype.element_ty), mask=mask)


def dequantized_factors(plan: LowRankPlan, slot: int, d_in: int, group_size: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot `slot`'s (V [dense_width, d_in], U [dense_width, max_d_out]) in `dtype` (see the module docstring); U's
    columns past a projection's d_out are zero."""
    device = plan.tiers.device
    # Zeros: padding rows must read as 0 (a NaN of uninitialised memory times z's zero column is still NaN).
    v = torch.zeros(plan.dense_width, d_in, dtype=dtype, device=device)
    u = torch.zeros(plan.dense_width, plan.max_d_out, dtype=dtype, device=device)
    block_d = min(128, group_size & -group_size)  # a column tile inside one scale group
    grid = (plan.tiers.shape[0], triton.cdiv(plan.max_rank_cap, DEQUANT_CONFIG["BLOCK_R"]),
            2 * triton.cdiv(max(d_in, plan.max_d_out), block_d))
    _dequantize_kernel[grid](v, u, plan.tiers, slot, d_in, group_size, v.stride(0), u.stride(0), BLOCK_D=block_d,
                             **DEQUANT_CONFIG)
    return v, u


def dequantized_factors_reference(projections: list[LowRankProjection], slot: int, d_in: int, group_size: int,
                                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch dequantized_factors (from PackedTierSlots.dense_factor)."""
    rows, _, width = dense_rows(projections)
    device = projections[0].tiers[0].device
    v = torch.zeros(width, d_in, device=device)
    u = torch.zeros(width, max(p.d_out for p in projections), device=device)
    for p, p_rows in zip(projections, rows):
        for t, row in zip(p.tiers, p_rows):
            vt = t.dense_factor("v", slot, d_in, group_size)
            r = vt.shape[0]
            v[row:row + r] = vt * t.s[slot, :r, None]
            u[row:row + r, :p.d_out] = t.dense_factor("u", slot, p.d_out, group_size)
    return v.to(dtype), u.to(dtype)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: on CUDA a half-precision GEMM accumulating and writing fp32 (no rounding of the
    product to half), elsewhere in fp32."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def add_dense_segments(y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, slice | torch.Tensor]],
                       plan: LowRankPlan, projections: list[LowRankProjection], group_size: int) -> None:
    """y[rows] += the low-rank delta of x[rows] at `slot`, for each (slot, rows) of `segments` (rows: a slice when
    they are consecutive, as a prefill chunk's are, else int64 indices), through dequantized factors (the
    kernels' semantics: fp32 sums, one rounding into y)."""
    for slot, rows in segments:
        v, u = dequantized_factors(plan, slot, x.shape[1], group_size, x.dtype)
        z = _mm_fp32(x[rows], v.T).to(x.dtype)  # [n, dense_width]; the second GEMM takes it in the activation dtype
        for p, (start, end) in zip(projections, plan.dense_spans):
            if start == end:
                continue
            out = y[rows, p.out_offset:p.out_offset + p.d_out]
            y[rows, p.out_offset:p.out_offset + p.d_out] = (
                out.float() + _mm_fp32(z[:, start:end], u[start:end, :p.d_out])).to(y.dtype)
