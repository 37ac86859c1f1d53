"""Expand: y[:, off : off + d_out] += z @ U summed over a projection's tiers, in place, for every row's slot.

Grid: (row tile of one slot's segment x SPLIT_R, block of output columns, projection). A program walks
every SPLIT_R-th rank block of all tiers of its projection, unpacking U's bit planes in registers, and adds
its fp32 sum atomically into an fp32 workspace, which then goes into y with one rounding. An N tile never
spans two scale groups, so each rank's group scale folds into z's column (fp32, tf32 on the tensor cores)
and the centred codes stay exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


from .bitplanes import tile_offsets, unpack_centred
from .bitserial import add_at_set_bits
from .lowrank_plan import (P_D_OUT, P_OUT_OFFSET, P_TIER_BEGIN, P_TIER_END, PROJ_COLS, T_U_PLANES, T_U_SCALES,
                           T_Z_COL, TIER_COLS, LowRankPlan, tier_factor, z_columns)
from .segment_tiles import decode_tile_rows, segment_tile_rows, tile_row_count
from .slot_metadata import SlotMetadata
from .slots import LowRankProjection
from .tuning import LaunchConfig, decode_config, launch_config, work_bucket
from .workspace import add_workspace, fp32_workspace


@triton.jit(do_not_specialize=["SPLIT_R", "DECODE_ROWS", "stride_zm"])
def _expand_kernel(
    ws_ptr, z_ptr, tiers_ptr, projs_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    group_size, stride_wm, stride_zm,
    BLOCK_M: tl.constexpr, DECODE_ROWS, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_R, UNPACK: tl.constexpr,
):
    """SGMV: row tiles of more than DECODE_ROWS rows, on the tensor cores."""
    pid_m, pid_n, proj = tl.program_id(0) // SPLIT_R, tl.program_id(1), tl.program_id(2)
    split = tl.program_id(0) % SPLIT_R  # this program takes rank blocks split, split + SPLIT_R, ... of each tier
    pdesc = projs_ptr + proj * PROJ_COLS
    d_out = tl.load(pdesc + P_D_OUT).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= d_out:  # the grid covers the widest projection
        return
    seg = tl.load(blk_seg_ptr + pid_m)
    if seg < 0:  # padding tile of static metadata
        return
    if tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M) <= DECODE_ROWS:
        return  # the decode kernel's tile
    slot = tl.load(seg_slots_ptr + seg)
    rows, m_mask = segment_tile_rows(sorted_rows_ptr, seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg,
                                     BLOCK_M)
    offs_n = n0 + tile_offsets(BLOCK_N, UNPACK)  # in the order unpack_centred gives the codes

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tier in range(tl.load(pdesc + P_TIER_BEGIN).to(tl.int32), tl.load(pdesc + P_TIER_END).to(tl.int32)):
        desc = tiers_ptr + tier * TIER_COLS
        rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(desc, slot, d_out, group_size,
                                                                                   T_U_PLANES, T_U_SCALES)
        z_col = tl.load(desc + T_Z_COL).to(tl.int32)
        for r0 in range(split * BLOCK_R, rank, SPLIT_R * BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            zt = tl.load(z_ptr + rows[:, None] * stride_zm + (z_col + offs_r)[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [M, R] fp32
            scale = tl.load(scales + offs_r * n_groups + n0 // group_size, mask=r_mask, other=0.0).to(tl.float32)
            q2 = unpack_centred(planes, plane_stride, n_words, offs_r, r_mask, n0 // 32, n_words, nbits,
                                tl.float32, BLOCK_R, BLOCK_N, UNPACK)  # [R, N] 2 * (code - centre)
            acc += tl.dot(zt * (0.5 * scale)[None, :], q2)
    out = ws_ptr + rows[:, None] * stride_wm + (tl.load(pdesc + P_OUT_OFFSET) + offs_n)[None, :]
    tl.atomic_add(out, acc, mask=m_mask[:, None] & (offs_n < d_out)[None, :], sem="relaxed")


@triton.jit
def _expand_word(planes, plane_stride, n_words, words, w_mask, scales, n_groups, groups, z_rows, row_ok, r, p, live):
    """Plane p's words of rank r ([NW] int32), and zs = z * scale / 2 per row and word ([ROWS, NW]) when p is 0
    (the codes are doubled: 2 * code - (2^nbits - 1)), else 0; nothing is read unless live."""
    # tl.where, not w_mask & live: Triton 3.6's interpreter rejects a vector mask and-ed with a scalar.
    w = tl.load(planes + p * plane_stride + r * n_words + words, mask=tl.where(live, w_mask, False), other=0)
    first = live & (p == 0)
    z = tl.load(z_rows + r, mask=tl.where(first, row_ok, False), other=0.0)  # [ROWS]
    scale = tl.load(scales + r * n_groups + groups, mask=tl.where(first, w_mask, False), other=0.0).to(tl.float32)
    return w, z[:, None] * 0.5 * scale[None, :]


@triton.jit
def _expand_word_next(planes, plane_stride, n_words, words, w_mask, scales, n_groups, groups, z_rows, row_ok, r, p,
                      live, nbits, SPLIT_R: tl.constexpr):
    """_expand_word's word and zs at (rank r, plane p), p, and the (rank, plane) of the program's next word:
    counters, not a division by nbits (~20 instructions)."""
    w, zs = _expand_word(planes, plane_stride, n_words, words, w_mask, scales, n_groups, groups, z_rows, row_ok,
                         r, p, live)
    p_next = p + 1
    return w, zs, p, tl.where(p_next == nbits, r + SPLIT_R, r), tl.where(p_next == nbits, 0, p_next)


@triton.jit
def _add_word(acc, centre, step, w, zs, p, odd):
    """acc, centre and step after the bits of word w of plane p; zs is 0 unless p is 0 (w starts a rank)."""
    step = tl.where(p == 0, 2.0 * zs, 2.0 * step)
    return add_at_set_bits(acc, w, step), centre + zs * odd, step


@triton.jit(do_not_specialize=["stride_zm"])
def _expand_decode_kernel(
    ws_ptr, z_ptr, tiers_ptr, projs_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    group_size, stride_wm, stride_zm,
    BLOCK_M, DECODE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_R: tl.constexpr, BLOCK_WORDS: tl.constexpr,
):
    """BGMV: row tiles of at most DECODE_ROWS rows, bit-serial on the CUDA cores (kernels/bitserial.py). A
    program holds BLOCK_N outputs of its rows in registers and walks ranks split, split + SPLIT_R, ...: for each
    rank and plane, one word per 32 outputs, each row's z times the group scale added where a bit is set (the
    rows share the bit test)."""
    pid_m, pid_n, proj = tl.program_id(0) // SPLIT_R, tl.program_id(1), tl.program_id(2)
    split = tl.program_id(0) % SPLIT_R
    pdesc = projs_ptr + proj * PROJ_COLS
    d_out = tl.load(pdesc + P_D_OUT).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= d_out:
        return
    seg = tl.load(blk_seg_ptr + pid_m)
    if seg < 0:
        return
    n_rows = tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M)
    if n_rows > DECODE_ROWS:
        return  # the tl.dot kernel's tile
    slot = tl.load(seg_slots_ptr + seg)
    words = n0 // 32 + tl.arange(0, BLOCK_N // 32)  # acc [ROWS, 32, NW]: bit j of word w is output 32 w + j
    rows, row_ok = decode_tile_rows(sorted_rows_ptr, blk_start_ptr, pid_m, n_rows, DECODE_ROWS)
    acc = tl.zeros((DECODE_ROWS, 32, BLOCK_N // 32), dtype=tl.float32)  # sum over ranks of 2 zs * code
    centre = tl.zeros((DECODE_ROWS, BLOCK_N // 32), dtype=tl.float32)  # sum over ranks of zs * (2^nbits - 1)
    for tier in range(tl.load(pdesc + P_TIER_BEGIN).to(tl.int32), tl.load(pdesc + P_TIER_END).to(tl.int32)):
        desc = tiers_ptr + tier * TIER_COLS
        rank, nbits, planes, plane_stride, scales, n_words, n_groups = tier_factor(
            desc, slot, d_out, group_size, T_U_PLANES, T_U_SCALES)
        w_mask = words < n_words
        groups = words * 32 // group_size
        z_rows = z_ptr + rows * stride_zm + tl.load(desc + T_Z_COL).to(tl.int32)
        odd = ((1 << nbits) - 1).to(tl.float32)
        # One loop over this program's (rank, plane) words, each loaded an iteration ahead, BLOCK_WORDS at a time:
        # a thread has that many loads in flight while it adds the last words' bits. At small batches the grid is
        # a few warps an SM, and with one word in flight a thread waited on memory latency, not bandwidth
        # (ptxas sinks a load of the same iteration below earlier adds, so only loop-carried loads stay ahead).
        # Four words a load made one- and two-row tiles 1.2-1.4x faster and spilled registers at four rows,
        # which keep one (bench/results/kernel_ab_expand_blocks.md).
        n_words_mine = tl.cdiv(tl.maximum(rank - split, 0), SPLIT_R) * nbits
        args = (planes, plane_stride, n_words, words, w_mask, scales, n_groups, groups, z_rows, row_ok)
        step = tl.zeros(centre.shape, dtype=tl.float32)  # what a set bit of the word's plane p adds: 2 zs 2^p
        w0, zs0, p0, r, p = _expand_word_next(*args, split, 0, n_words_mine > 0, nbits, SPLIT_R)
        if BLOCK_WORDS == 1:
            for i in range(1, n_words_mine + 1):  # adds word i - 1, loads word i
                v0, ys0, q0, r, p = _expand_word_next(*args, r, p, i < n_words_mine, nbits, SPLIT_R)
                acc, centre, step = _add_word(acc, centre, step, w0, zs0, p0, odd)
                w0, zs0, p0 = v0, ys0, q0
        else:
            w1, zs1, p1, r, p = _expand_word_next(*args, r, p, n_words_mine > 1, nbits, SPLIT_R)
            w2, zs2, p2, r, p = _expand_word_next(*args, r, p, n_words_mine > 2, nbits, SPLIT_R)
            w3, zs3, p3, r, p = _expand_word_next(*args, r, p, n_words_mine > 3, nbits, SPLIT_R)
            for i in range(4, n_words_mine + 4, 4):  # adds words i - 4 .. i - 1, loads words i .. i + 3
                v0, ys0, q0, r, p = _expand_word_next(*args, r, p, i < n_words_mine, nbits, SPLIT_R)
                v1, ys1, q1, r, p = _expand_word_next(*args, r, p, i + 1 < n_words_mine, nbits, SPLIT_R)
                v2, ys2, q2, r, p = _expand_word_next(*args, r, p, i + 2 < n_words_mine, nbits, SPLIT_R)
                v3, ys3, q3, r, p = _expand_word_next(*args, r, p, i + 3 < n_words_mine, nbits, SPLIT_R)
                acc, centre, step = _add_word(acc, centre, step, w0, zs0, p0, odd)
                if i - 3 < n_words_mine:  # the last block's words can lie past the program's
                    acc, centre, step = _add_word(acc, centre, step, w1, zs1, p1, odd)
                if i - 2 < n_words_mine:
                    acc, centre, step = _add_word(acc, centre, step, w2, zs2, p2, odd)
                if i - 1 < n_words_mine:
                    acc, centre, step = _add_word(acc, centre, step, w3, zs3, p3, odd)
                w0, w1, w2, w3, zs0, zs1, zs2, zs3 = v0, v1, v2, v3, ys0, ys1, ys2, ys3
                p0, p1, p2, p3 = q0, q1, q2, q3
    # Output n0 + 32 w + j in order: the atomic adds of a warp then hit contiguous addresses (in acc's layout each
    # lane's 32 outputs were one word apart, a cache line per lane).
    out_n = n0 + tl.arange(0, BLOCK_N)
    tl.atomic_add(ws_ptr + rows[:, None] * stride_wm + tl.load(pdesc + P_OUT_OFFSET) + out_n[None, :],
                  tl.reshape(tl.permute(acc - centre[:, None, :], (0, 2, 1)), (DECODE_ROWS, BLOCK_N)),
                  mask=row_ok[:, None] & (out_n < d_out)[None, :], sem="relaxed")


def expand_triton(y: torch.Tensor, z: torch.Tensor, meta: SlotMetadata, plan: LowRankPlan, group_size: int,
                  config: LaunchConfig | None = None, ws: torch.Tensor | None = None) -> None:
    """y [B, D_out_total] += expand(z fp32 [B, plan.z_width]) in place; rows of slot -1 untouched. config:
    tuning.launch_config's unless given. ws: a zeroed fp32 workspace shaped like y (the shrink's first launch
    zeroes it in add_lowrank_delta_triton), else one is made here."""
    tiles = meta.launch_tiles()
    if tiles is None or plan.max_d_out == 0:
        return
    block_m, blk_seg, blk_start = tiles
    ws = fp32_workspace(y) if ws is None else ws
    decode, dot, decode_rows = meta.tile_kinds("expand")
    work = work_bucket(blk_seg.shape[0])
    args = (ws, z, plan.tiers, plan.projections, meta.sorted_rows, meta.seg_slots, meta.seg_starts, meta.seg_lens,
            blk_seg, blk_start, group_size, ws.stride(0), z.stride(0))
    if dot:
        config = config or launch_config("expand", (plan.max_d_out,), group_size, work, block_m)
        _, block_n, split_r = config.tiles
        grid = (blk_seg.shape[0] * split_r, triton.cdiv(plan.max_d_out, block_n), plan.projections.shape[0])
        _expand_kernel[grid](*args, BLOCK_M=block_m, DECODE_ROWS=decode_rows, **config.launch_kwargs("expand"))
    if decode:
        d = decode_config("expand", work, group_size, decode_rows)
        grid = (blk_seg.shape[0] * d["SPLIT_R"], triton.cdiv(plan.max_d_out, d["BLOCK_N"]), plan.projections.shape[0])
        _expand_decode_kernel[grid](*args, BLOCK_M=block_m, DECODE_ROWS=decode_rows, **d)
    add_workspace(y, ws)


def expand_reference(y: torch.Tensor, z: torch.Tensor, meta: SlotMetadata, projections: list[LowRankProjection],
                     group_size: int) -> None:
    """PyTorch expand with expand_triton's semantics: one fp32 sum per projection, one rounding into y."""
    cols, _ = z_columns(projections)
    for slot, start, n in zip(meta.seg_slots_host, meta.seg_starts_host, meta.seg_lens_host):
        rows = meta.sorted_rows[start:start + n].long()
        for p, p_cols in zip(projections, cols):
            acc = torch.zeros(n, p.d_out, dtype=torch.float32, device=y.device)
            for t, col in zip(p.tiers, p_cols):
                u = t.dense_factor("u", slot, p.d_out, group_size)    # [rank, d_out]
                if u.shape[0]:
                    acc += z[rows, col:col + u.shape[0]] @ u
            out = y[rows, p.out_offset:p.out_offset + p.d_out]
            y[rows, p.out_offset:p.out_offset + p.d_out] = (out.float() + acc).to(y.dtype)
