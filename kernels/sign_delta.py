"""BitDelta: y[:, off : off + d_out] += scale[slot] * x @ sign[slot]^T, batched over slots and projections.

Grid: (row tile of one slot's segment x SPLIT_K pieces of d_in, block of output rows of the sign matrix,
projection). The 1-bit signs unpack in registers to +-1 (exact in fp16/bf16) and go through tl.dot with the
x tile; the per-slot scale is applied to the fp32 partial sum, added atomically into an fp32 workspace that
then goes into y with one rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deltaserve.delta_store.packing import unpack_bitplanes

from .bitplanes import tile_offsets, unpack_centred
from .activation_quant import quantize_rows
from .bitserial import fixed_point_range_dots
from .segment_tiles import decode_tile_rows, segment_tile_rows, split_k_range, tile_row_count
from .slot_metadata import SlotMetadata
from .slots import SignProjection, check_sign_call
from .tables import device_table
from .tuning import LaunchConfig, _interpreting, decode_config, dot_dtype, launch_config, work_bucket
from .workspace import add_workspace, fp32_workspace

# Columns of a projection descriptor (int64 each).
S_SIGNS = tl.constexpr(0)
S_SCALES = tl.constexpr(1)
S_OUT_OFFSET = tl.constexpr(2)
S_D_OUT = tl.constexpr(3)
SIGN_COLS = tl.constexpr(4)


@dataclass(frozen=True)
class SignPlan:
    table: torch.Tensor  # int64 [P, SIGN_COLS]
    max_d_out: int


def sign_plan_for(projections: list[SignProjection]) -> SignPlan:
    """The descriptor table of a projection list: build it once and pass it to every call (a graph captures its
    address); cached on its contents, so a rebuilt list reuses it."""
    rows = [(p.signs.data_ptr(), p.scales.data_ptr(), p.out_offset, p.d_out) for p in projections]
    device = projections[0].signs.device if projections else torch.device("cpu")
    return SignPlan(device_table(rows, SIGN_COLS.value, device), max((p.d_out for p in projections), default=0))


@triton.jit(do_not_specialize=["SPLIT_K", "DECODE_ROWS"])
def _sign_kernel(
    ws_ptr, x_ptr, projs_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    d_in, stride_wm, stride_xm,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, DECODE_ROWS, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K, UNPACK: tl.constexpr,
):
    """SGMV: row tiles of more than DECODE_ROWS rows, on the tensor cores."""
    pid_m, pid_n, proj = tl.program_id(0) // SPLIT_K, tl.program_id(1), tl.program_id(2)
    seg, slot, signs, scale, out_offset, offs_n, n_mask, n_words = _program_signs(
        projs_ptr, blk_seg_ptr, seg_slots_ptr, pid_m, pid_n, proj, d_in, BLOCK_N)
    if seg < 0:  # past the widest projection's rows, or a padding tile of static metadata
        return
    if tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M) <= DECODE_ROWS:
        return  # the decode kernel's tile
    k_begin, k_end = split_k_range(d_in, tl.program_id(0) % SPLIT_K, BLOCK_K, SPLIT_K)  # this program's d_in
    if k_begin >= k_end:
        return  # more splits than d_in has k tiles: no atomic adds of zeros
    rows, m_mask = segment_tile_rows(sorted_rows_ptr, seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg,
                                     BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tile_offsets(BLOCK_K, UNPACK)  # in the order unpack_centred gives the signs
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k[None, :] < d_in), other=0.0)  # [M, K]
        sign = unpack_centred(signs, 0, n_words, offs_n, n_mask, k0 // 32, n_words, 1,
                              DOT_DTYPE, BLOCK_N, BLOCK_K, UNPACK)  # [N, K] 2 * bit - 1
        acc += tl.dot(xt.to(DOT_DTYPE), tl.trans(sign))
    out = ws_ptr + rows[:, None] * stride_wm + (out_offset + offs_n)[None, :]
    tl.atomic_add(out, acc * scale, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")


@triton.jit
def _sign_decode_kernel(
    ws_ptr, xq_ptr, xs_ptr, projs_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, blk_seg_ptr, blk_start_ptr,
    d_in, stride_wm, stride_qm, stride_sm,
    BLOCK_M, DECODE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, ASM: tl.constexpr,
):
    """BGMV: row tiles of at most DECODE_ROWS rows, on the CUDA cores, one pass over the sign words for all rows of
    the tile: x as 24-bit fixed point in groups of BLOCK_K (kernels/activation_quant.py) meets the signs through
    dp4a (kernels/bitserial.fixed_point_range_dots), as in the shrink decode kernel."""
    pid_m, pid_n, proj = tl.program_id(0) // SPLIT_K, tl.program_id(1), tl.program_id(2)
    seg, slot, signs, scale, out_offset, offs_n, n_mask, n_words = _program_signs(
        projs_ptr, blk_seg_ptr, seg_slots_ptr, pid_m, pid_n, proj, d_in, BLOCK_N)
    if seg < 0:
        return
    n_rows = tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M)
    if n_rows > DECODE_ROWS:
        return  # the tl.dot kernel's tile
    k_begin, k_end = split_k_range(d_in, tl.program_id(0) % SPLIT_K, BLOCK_K, SPLIT_K)
    if k_begin >= k_end:
        return  # more splits than d_in has k tiles: no atomic adds of zeros
    rows, row_ok = decode_tile_rows(sorted_rows_ptr, blk_start_ptr, pid_m, n_rows, DECODE_ROWS)
    acc = fixed_point_range_dots(signs + offs_n * n_words, n_mask, 0, 1, n_words, xq_ptr + rows * stride_qm,
                                 xs_ptr + rows * stride_sm, row_ok, k_begin, k_end, None, BLOCK_K, BLOCK_K,
                                 ASM)  # [ROWS, N] (2 bit - 1) . x
    tl.atomic_add(ws_ptr + rows[:, None] * stride_wm + (out_offset + offs_n)[None, :], acc * scale,
                  mask=row_ok[:, None] & n_mask[None, :], sem="relaxed")


@triton.jit
def _program_signs(projs_ptr, blk_seg_ptr, seg_slots_ptr, pid_m, pid_n, proj, d_in, BLOCK_N: tl.constexpr):
    """What a program of either kernel works on: (segment, -1 for nothing to do; slot; the slot's sign words
    int32 pointer; its scale; the projection's first output column; sign rows offs_n [BLOCK_N] and their mask;
    words per sign row)."""
    desc = projs_ptr + proj * SIGN_COLS
    d_out = tl.load(desc + S_D_OUT).to(tl.int32)
    seg = tl.load(blk_seg_ptr + pid_m)
    seg = tl.where(pid_n * BLOCK_N < d_out, seg, -1)  # the grid covers the widest projection
    slot = tl.load(seg_slots_ptr + tl.maximum(seg, 0)).to(tl.int64)
    n_words = tl.cdiv(d_in, 32)
    signs = tl.load(desc + S_SIGNS).to(tl.pointer_type(tl.int32)) + slot * d_out * n_words
    scale = tl.load(tl.load(desc + S_SCALES).to(tl.pointer_type(tl.float32)) + slot)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return seg, slot, signs, scale, tl.load(desc + S_OUT_OFFSET), offs_n, offs_n < d_out, n_words


def add_sign_delta_triton(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata,
                          projections: list[SignProjection], plan: SignPlan | None = None,
                          config: LaunchConfig | None = None) -> None:
    """Triton path on any device Triton runs on (CUDA, or CPU tensors under TRITON_INTERPRET=1). config:
    tuning.launch_config's unless given (bench/tune_kernels.py times candidates through it)."""
    check_sign_call(y, x, meta.num_rows, meta.num_slots, meta.row_slots.device, projections)
    tiles = meta.launch_tiles()
    if not projections or tiles is None:
        return
    plan = sign_plan_for(projections) if plan is None else plan
    if plan.table.shape[0] != len(projections):
        raise ValueError(f"the plan is for {plan.table.shape[0]} projections, the call has {len(projections)}")
    block_m, blk_seg, blk_start = tiles
    decode, dot, decode_rows = meta.tile_kinds("sign")
    work = work_bucket(blk_seg.shape[0])
    if decode:  # x's scale groups are the decode kernel's k tiles; the same launch zeroes the workspace
        d = decode_config("sign", work, None, decode_rows)
        ws = torch.empty(y.shape, dtype=torch.float32, device=y.device)
        xq = quantize_rows(x, d["BLOCK_K"], ws)
    else:
        ws = fp32_workspace(y)
    meta_args = (meta.sorted_rows, meta.seg_slots, meta.seg_starts, meta.seg_lens, blk_seg, blk_start, x.shape[1],
                 ws.stride(0))
    if dot:
        config = config or launch_config("sign", (x.shape[1], plan.max_d_out), None, work, block_m)
        block_n, _, split_k = config.tiles
        grid = (blk_seg.shape[0] * split_k, triton.cdiv(plan.max_d_out, block_n), len(projections))
        _sign_kernel[grid](ws, x, plan.table, *meta_args, x.stride(0), DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=block_m,
                           DECODE_ROWS=decode_rows, **config.launch_kwargs("sign"))
    if decode:
        grid = (blk_seg.shape[0] * d["SPLIT_K"], triton.cdiv(plan.max_d_out, d["BLOCK_N"]), len(projections))
        _sign_decode_kernel[grid](ws, xq.words, xq.scales, plan.table, *meta_args, xq.words.stride(0),
                                  xq.scales.stride(0), BLOCK_M=block_m, DECODE_ROWS=decode_rows,
                                  ASM=not _interpreting(), **d)
    add_workspace(y, ws)


def add_sign_delta_reference(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata,
                             projections: list[SignProjection]) -> None:
    check_sign_call(y, x, meta.num_rows, meta.num_slots, meta.row_slots.device, projections)
    d_in = x.shape[1]
    for slot, start, n in zip(meta.seg_slots_host, meta.seg_starts_host, meta.seg_lens_host):
        rows = meta.sorted_rows[start:start + n].long()
        for p in projections:
            sign = unpack_bitplanes(p.signs[slot].unsqueeze(0), d_in).float() * 2 - 1  # [d_out, d_in]
            out = y[rows, p.out_offset:p.out_offset + p.d_out]
            delta = (x[rows].float() @ sign.T) * p.scales[slot]
            y[rows, p.out_offset:p.out_offset + p.d_out] = (out.float() + delta).to(y.dtype)


def add_sign_delta(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata, projections: list[SignProjection],
                   use_triton: bool | None = None, plan: SignPlan | None = None) -> None:
    """y [B, D_out_total] += per row with slot k >= 0, per projection p:
        y[row, p.out_offset : p.out_offset + p.d_out] += p.scales[k] * x[row] @ (2 * bits(p.signs[k]) - 1).T
    in fp32 with one rounding. use_triton None: CUDA tensors run the Triton kernel, others the PyTorch
    reference; False forces the reference (a baseline). plan: sign_plan_for(projections), built once by the
    caller. Graph capture as for add_lowrank_delta (static metadata, a prebuilt plan, one warm-up call)."""
    if x.is_cuda if use_triton is None else use_triton:
        add_sign_delta_triton(y, x, meta, projections, plan)
    else:
        add_sign_delta_reference(y, x, meta, projections)
