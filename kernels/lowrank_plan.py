"""Launch plan of a low-rank delta call: where each tier's buffers live and where its rank columns sit in z.

One shrink launch covers every tier of every stacked projection, so the kernels find a tier's buffers
through a small int64 table of addresses and sizes (the way vLLM's LoRA kernels pass per-slice pointers)
instead of one launch per tensor. z, the rank-r intermediate, is fp32 [B, sum of rank_cap over tiers].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .slots import LowRankProjection
from .tables import device_table

# Columns of a tier descriptor (int64 each).
T_V_PLANES = tl.constexpr(0)
T_V_SCALES = tl.constexpr(1)
T_U_PLANES = tl.constexpr(2)
T_U_SCALES = tl.constexpr(3)
T_S = tl.constexpr(4)
T_RANKS = tl.constexpr(5)
T_BITS = tl.constexpr(6)
T_RANK_CAP = tl.constexpr(7)
T_BITS_CAP = tl.constexpr(8)
T_Z_COL = tl.constexpr(9)
T_D_OUT = tl.constexpr(10)  # d_out of the tier's projection
T_DENSE_ROW = tl.constexpr(11)  # first row of the tier in the dense path's factors (lowrank_dense)
TIER_COLS = tl.constexpr(12)
DENSE_ALIGN = 64  # the dense path's factor rows of each projection start at a multiple of this
# Columns of a projection descriptor: its tiers are rows [begin, end) of the tier table.
P_TIER_BEGIN = tl.constexpr(0)
P_TIER_END = tl.constexpr(1)
P_OUT_OFFSET = tl.constexpr(2)
P_D_OUT = tl.constexpr(3)
PROJ_COLS = tl.constexpr(4)


@triton.jit
def tier_factor(desc, slot, d, group_size, PLANES: tl.constexpr, SCALES: tl.constexpr):
    """Where slot's V (PLANES=T_V_PLANES, SCALES=T_V_SCALES, d = d_in) or U (T_U_PLANES, T_U_SCALES, d = d_out)
    lives in the tier at descriptor desc: (rank, nbits, planes int32 pointer of plane 0 row 0, plane stride,
    scales fp16 pointer of rank 0, words per row, scale groups per row)."""
    rank = tl.load(tl.load(desc + T_RANKS).to(tl.pointer_type(tl.int32)) + slot)
    nbits = tl.load(tl.load(desc + T_BITS).to(tl.pointer_type(tl.int32)) + slot)
    rank_cap = tl.load(desc + T_RANK_CAP).to(tl.int32)
    bits_cap = tl.load(desc + T_BITS_CAP).to(tl.int32)
    n_words = tl.cdiv(d, 32)
    n_groups = tl.cdiv(d, group_size)
    slot64 = slot.to(tl.int64)
    planes = tl.load(desc + PLANES).to(tl.pointer_type(tl.int32)) + slot64 * bits_cap * rank_cap * n_words
    scales = tl.load(desc + SCALES).to(tl.pointer_type(tl.float16)) + slot64 * rank_cap * n_groups
    return rank, nbits, planes, rank_cap * n_words, scales, n_words, n_groups


def tier_offsets(projections: list[LowRankProjection], align: int = 1
                 ) -> tuple[list[list[int]], list[tuple[int, int]], int]:
    """Where each tier's ranks start in a layout of all projections' ranks one after another (per projection),
    each projection's [start, end), and the total: tier t of a projection owns rank_cap entries, and every
    projection starts at a multiple of `align`."""
    offsets, spans, width = [], [], 0
    for p in projections:
        start = width
        offsets.append([])
        for t in p.tiers:
            offsets[-1].append(width)
            width += t.rank_cap
        width = -(-width // align) * align
        spans.append((start, width))
    return offsets, spans, width


def z_columns(projections: list[LowRankProjection]) -> tuple[list[list[int]], int]:
    """First z column of each tier (per projection) and z's width."""
    cols, _, width = tier_offsets(projections)
    return cols, width


def dense_rows(projections: list[LowRankProjection]) -> tuple[list[list[int]], list[tuple[int, int]], int]:
    """The dense path's factor layout (lowrank_dense): tier_offsets with every projection starting at a multiple
    of DENSE_ALIGN: cuBLAS takes its slow pre-Hopper GEMMs for operands whose leading dimension is not a
    multiple of 8 (the profile of a 941-rank delta on the H100: a sm75 kernel at 80 TFLOP/s)."""
    return tier_offsets(projections, DENSE_ALIGN)


@dataclass(frozen=True)
class LowRankPlan:
    tiers: torch.Tensor  # int64 [T, TIER_COLS], T = tiers of all projections, in order
    projections: torch.Tensor  # int64 [P, PROJ_COLS]
    z_width: int
    max_rank_cap: int
    max_d_out: int
    dense_spans: tuple[tuple[int, int], ...]  # dense_rows' per-projection rows
    dense_width: int


def lowrank_plan_for(projections: list[LowRankProjection]) -> LowRankPlan:
    """The tables of a projection list. Build it once per list of buffers and pass it to every call (a graph
    captures its address); the tables are cached on their contents, so a rebuilt list reuses them."""
    cols, z_width = z_columns(projections)
    d_rows, spans, dense_width = dense_rows(projections)
    tier_rows, proj_rows = [], []
    for p, p_cols, p_dense in zip(projections, cols, d_rows):
        begin = len(tier_rows)
        for t, z_col, dense_row in zip(p.tiers, p_cols, p_dense):
            tier_rows.append((t.v_planes.data_ptr(), t.v_scales.data_ptr(), t.u_planes.data_ptr(),
                              t.u_scales.data_ptr(), t.s.data_ptr(), t.ranks.data_ptr(), t.bits.data_ptr(),
                              t.rank_cap, t.bits_cap, z_col, p.d_out, dense_row))
        proj_rows.append((begin, len(tier_rows), p.out_offset, p.d_out))
    device = next((p.tiers[0].device for p in projections if p.tiers), torch.device("cpu"))
    return LowRankPlan(
        tiers=device_table(tier_rows, TIER_COLS.value, device),
        projections=device_table(proj_rows, PROJ_COLS.value, device),
        z_width=z_width,
        max_rank_cap=max((t.rank_cap for p in projections for t in p.tiers), default=0),
        max_d_out=max((p.d_out for p in projections), default=0),
        dense_spans=tuple(spans),
        dense_width=dense_width,
    )
