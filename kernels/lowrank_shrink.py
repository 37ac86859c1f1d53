"""Shrink: z = (x @ V^T) * s for every row's slot, every tier of every stacked projection, in one launch.

Grid: (row tile of one slot's segment x SPLIT_K pieces of d_in, tier, block of ranks). A program streams its
slot's V bit planes along its piece of d_in, unpacks them in registers at the slot's bit-width, and multiplies
the centred codes (exact in fp16/bf16: half-integers below 128, kept doubled as odd integers) by the x tile on
the tensor cores; the group scale is applied to the fp32 partial product, which is exact because a K tile
never spans two scale groups.
z stays fp32 (Punica lost accuracy keeping it in half); the SPLIT_K partial sums meet in it atomically.
Decode and prefill share this kernel: the row tile (BLOCK_M, 16..64) holds a whole decode segment, so rows
sharing a slot read its bytes once; prefill segments take several tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


from .activation_quant import quantize_rows
from .bitplanes import tile_offsets, unpack_centred
from .bitserial import fixed_point_range_dots
from .lowrank_plan import (T_RANK_CAP, T_S, T_V_PLANES, T_V_SCALES, T_Z_COL, TIER_COLS, LowRankPlan, tier_factor,
                           z_columns)
from .segment_tiles import decode_tile_rows, segment_tile_rows, split_k_range, tile_row_count
from .slot_metadata import SlotMetadata
from .slots import LowRankProjection
from .tuning import LaunchConfig, decode_config, _interpreting, dot_dtype, launch_config, work_bucket


@triton.jit
def _tier_slot_s(desc, slot, offs_r, r_mask):
    """fp32 [BLOCK_R] singular values s of slot's ranks offs_r in the tier at desc."""
    s_ptr = tl.load(desc + T_S).to(tl.pointer_type(tl.float32))
    rank_cap = tl.load(desc + T_RANK_CAP).to(tl.int64)
    return tl.load(s_ptr + slot.to(tl.int64) * rank_cap + offs_r, mask=r_mask, other=0.0)


@triton.jit(do_not_specialize=["SPLIT_K", "DECODE_ROWS", "stride_zm"])
def _shrink_kernel(
    x_ptr, z_ptr, tiers_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    d_in, group_size, stride_xm, stride_zm,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, DECODE_ROWS, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K, UNPACK: tl.constexpr,
):
    """SGMV: row tiles of more than DECODE_ROWS rows, on the tensor cores."""
    pid_m, tier, pid_r = tl.program_id(0) // SPLIT_K, tl.program_id(1), tl.program_id(2)
    seg = tl.load(blk_seg_ptr + pid_m)
    if seg < 0:  # padding tile of static metadata
        return
    if tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M) <= DECODE_ROWS:
        return  # the decode kernel's tile
    slot = tl.load(seg_slots_ptr + seg)
    desc = tiers_ptr + tier * TIER_COLS
    rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(desc, slot, d_in, group_size,
                                                                               T_V_PLANES, T_V_SCALES)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:  # the grid covers the largest tier; smaller tiers and ranks exit here
        return
    k_begin, k_end = split_k_range(d_in, tl.program_id(0) % SPLIT_K, BLOCK_K, SPLIT_K)  # this program's d_in
    if k_begin >= k_end:
        return  # more splits than d_in has k tiles: no atomic adds of zeros
    rows, m_mask = segment_tile_rows(sorted_rows_ptr, seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg,
                                     BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tile_offsets(BLOCK_K, UNPACK)  # in the order unpack_centred gives the codes
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k[None, :] < d_in), other=0.0)  # [M, K]
        q2 = unpack_centred(planes, plane_stride, n_words, offs_r, r_mask, k0 // 32, n_words, nbits,
                            DOT_DTYPE, BLOCK_R, BLOCK_K, UNPACK)  # [R, K] 2 * (code - centre)
        scale = tl.load(scales + offs_r * n_groups + k0 // group_size, mask=r_mask, other=0.0).to(tl.float32)
        acc += tl.dot(xt.to(DOT_DTYPE), tl.trans(q2)) * (0.5 * scale)[None, :]
    s = _tier_slot_s(desc, slot, offs_r, r_mask)
    z_col = tl.load(desc + T_Z_COL).to(tl.int32)
    tl.atomic_add(z_ptr + rows[:, None] * stride_zm + (z_col + offs_r)[None, :], acc * s[None, :],
                  mask=m_mask[:, None] & r_mask[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["stride_zm"])
def _shrink_decode_kernel(
    xq_ptr, xs_ptr, z_ptr, tiers_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    d_in, group_size, stride_qm, stride_sm, stride_zm,
    BLOCK_M, DECODE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SHARE_ROWS: tl.constexpr, ASM: tl.constexpr,
):
    """BGMV: row tiles of at most DECODE_ROWS rows, on the CUDA cores: x as 24-bit fixed point
    (kernels/activation_quant.py; xq_ptr its int32 words, xs_ptr its group scales) meets the bit planes through
    dp4a (kernels/bitserial.fixed_point_range_dots). By default one pass over the slot's words per row (the later
    rows read them from L1/L2). With the fp32 loop before this one, two rows' worth of x in one pass took 148
    registers instead of 80, which halved the programs an SM holds and made the shrink ~18% slower than two passes
    (bench/results/decode_rows_sweep_shared_shrink.md, at 128 ranks a program on 4 warps). SHARE_ROWS makes the
    tile's rows share each pass and plane word, as the expand and sign decode kernels do: since the k tile's codes
    are built before dp4a (bitserial.py), sharing them is what pays, so the built-in defaults take it for tiles of
    two rows and up (bench/results/kernel_ab_rows4.md), as bench/tune_decode.py's H100 table does at 2-32 row tiles
    (bench/results/decode_tuning.md)."""
    pid_m, tier, pid_r = tl.program_id(0) // SPLIT_K, tl.program_id(1), tl.program_id(2)
    seg = tl.load(blk_seg_ptr + pid_m)
    if seg < 0:
        return
    n_rows = tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M)
    if n_rows > DECODE_ROWS:
        return  # the tl.dot kernel's tile
    slot = tl.load(seg_slots_ptr + seg)
    desc = tiers_ptr + tier * TIER_COLS
    rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(desc, slot, d_in, group_size,
                                                                               T_V_PLANES, T_V_SCALES)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    k_begin, k_end = split_k_range(d_in, tl.program_id(0) % SPLIT_K, BLOCK_K, SPLIT_K)
    if k_begin >= k_end:
        return  # more splits than d_in has k tiles: no atomic adds of zeros
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    s = _tier_slot_s(desc, slot, offs_r, r_mask)
    z_col = tl.load(desc + T_Z_COL).to(tl.int32)
    if SHARE_ROWS:
        rows, row_ok = decode_tile_rows(sorted_rows_ptr, blk_start_ptr, pid_m, n_rows, DECODE_ROWS)
        _add_range_dots(z_ptr, stride_zm, rows, row_ok, planes, offs_r, r_mask, plane_stride, nbits, n_words,
                        xq_ptr, stride_qm, xs_ptr, stride_sm, k_begin, k_end, scales, n_groups, group_size, s, z_col,
                        BLOCK_K, ASM)
    else:
        first = tl.load(blk_start_ptr + pid_m)
        for i in range(0, n_rows):  # one row at a time: see the docstring
            row = tl.load(sorted_rows_ptr + first + i + tl.zeros((1,), dtype=tl.int32)).to(tl.int64)  # [1]
            _add_range_dots(z_ptr, stride_zm, row, row >= 0, planes, offs_r, r_mask, plane_stride, nbits, n_words,
                            xq_ptr, stride_qm, xs_ptr, stride_sm, k_begin, k_end, scales, n_groups, group_size, s,
                            z_col, BLOCK_K, ASM)


@triton.jit
def _add_range_dots(z_ptr, stride_zm, rows, row_ok, planes, offs_r, r_mask, plane_stride, nbits, n_words, xq_ptr,
                    stride_qm, xs_ptr, stride_sm, k_begin, k_end, scales, n_groups, group_size, s, z_col,
                    BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """z[rows, z_col + offs_r] += (V x_row)[offs_r] * s over this program's k range, for rows [X] sharing each
    plane word (kernels/bitserial.fixed_point_range_dots)."""
    acc = fixed_point_range_dots(planes + offs_r * n_words, r_mask, plane_stride, nbits, n_words,
                                 xq_ptr + rows * stride_qm, xs_ptr + rows * stride_sm, row_ok, k_begin, k_end,
                                 scales + offs_r * n_groups, group_size, BLOCK_K, ASM)  # [X, R] 2 (code - centre) . x
    tl.atomic_add(z_ptr + rows[:, None] * stride_zm + (z_col + offs_r)[None, :], acc * (0.5 * s)[None, :],
                  mask=row_ok[:, None] & r_mask[None, :], sem="relaxed")


def shrink_triton(x: torch.Tensor, meta: SlotMetadata, plan: LowRankPlan, group_size: int,
                  config: LaunchConfig | None = None, zeroed: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, d_in] fp16/bf16/fp32 -> z fp32 [B, plan.z_width]. Only (row, column) pairs of a row's slot within
    that slot's rank are written (the rest stays 0; expand never reads it). config: tuning.launch_config's
    unless given (bench/tune_kernels.py times candidates through it). zeroed: fp32 [B, z_width + w] to hold z in
    its first z_width columns; the call zeroes all of it in its first launch (add_lowrank_delta_triton's expand
    workspace takes the other w)."""
    if zeroed is None:
        zeroed = torch.empty(x.shape[0], plan.z_width, dtype=torch.float32, device=x.device)
    z = zeroed[:, :plan.z_width]
    tiles = meta.launch_tiles()
    if tiles is None or plan.max_rank_cap == 0:
        zeroed.zero_()
        return z
    decode, dot, decode_rows = meta.tile_kinds("shrink")
    if decode:
        xq = quantize_rows(x, group_size, zeroed)
    else:
        zeroed.zero_()
    block_m, blk_seg, blk_start = tiles
    work = work_bucket(blk_seg.shape[0])
    meta_args = (meta.sorted_rows, meta.seg_slots, meta.seg_starts, meta.seg_lens, blk_seg, blk_start,
                 x.shape[1], group_size, x.stride(0), z.stride(0))
    if dot:
        config = config or launch_config("shrink", (x.shape[1], plan.max_rank_cap), group_size, work, block_m)
        block_r, _, split_k = config.tiles
        grid = (blk_seg.shape[0] * split_k, plan.tiers.shape[0], triton.cdiv(plan.max_rank_cap, block_r))
        _shrink_kernel[grid](x, z, plan.tiers, *meta_args, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=block_m,
                             DECODE_ROWS=decode_rows, **config.launch_kwargs("shrink"))
    if decode:
        d = decode_config("shrink", work, group_size, decode_rows)
        grid = (blk_seg.shape[0] * d["SPLIT_K"], plan.tiers.shape[0], triton.cdiv(plan.max_rank_cap, d["BLOCK_R"]))
        _shrink_decode_kernel[grid](xq.words, xq.scales, z, plan.tiers, *meta_args[:-2], xq.words.stride(0),
                                    xq.scales.stride(0), z.stride(0), BLOCK_M=block_m, DECODE_ROWS=decode_rows,
                                    ASM=not _interpreting(), **d)
    return z


def shrink_reference(x: torch.Tensor, meta: SlotMetadata, projections: list[LowRankProjection],
                     group_size: int) -> torch.Tensor:
    """PyTorch shrink with shrink_triton's z layout; unwritten entries are 0 here."""
    cols, width = z_columns(projections)
    z = torch.zeros(x.shape[0], width, dtype=torch.float32, device=x.device)
    for slot, start, n in zip(meta.seg_slots_host, meta.seg_starts_host, meta.seg_lens_host):
        rows = meta.sorted_rows[start:start + n].long()
        for p, p_cols in zip(projections, cols):
            for t, col in zip(p.tiers, p_cols):
                v = t.dense_factor("v", slot, x.shape[1], group_size)   # [rank, d_in]: the rank without a device read
                r = v.shape[0]
                if r == 0:
                    continue
                z[rows, col:col + r] = (x[rows].float() @ v.T) * t.s[slot, :r]
    return z
