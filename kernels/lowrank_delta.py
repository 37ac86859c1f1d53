"""add_lowrank_delta: the engine's entry point for quantized low-rank (Delta-CoMe) deltas.

Two launches, shrink then expand, with z fp32 [B, sum of ranks] between them: expand needs every rank of
a row before it can finish any output element, and a fused kernel would either recompute z per output
tile (re-reading V d_out / BLOCK_N times) or need a grid-wide barrier. bench/kernel_bench.py times the two
launches separately to show what the split costs. A tenant with DENSE_MIN_ROWS+ rows in one call (a prefill
chunk) takes lowrank_dense.py instead: its factors dequantized once, then two GEMMs.
"""
from __future__ import annotations

import torch

from .lowrank_dense import DENSE_MIN_ROWS, add_dense_segments
from .lowrank_expand import expand_reference, expand_triton
from .lowrank_plan import LowRankPlan, lowrank_plan_for
from .lowrank_shrink import shrink_reference, shrink_triton
from .slot_metadata import SlotMetadata
from .slots import LowRankProjection, check_lowrank_call


def add_lowrank_delta_triton(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata,
                             projections: list[LowRankProjection], group_size: int,
                             plan: LowRankPlan | None = None) -> None:
    """Triton path on any device Triton runs on (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    check_lowrank_call(y, x, meta.num_rows, meta.num_slots, meta.row_slots.device, projections, group_size)
    if not projections:
        return
    plan = lowrank_plan_for(projections) if plan is None else plan
    if plan.projections.shape[0] != len(projections):
        raise ValueError(f"the plan is for {plan.projections.shape[0]} projections, the call has {len(projections)}")
    meta, long_segments = meta.split_long(DENSE_MIN_ROWS)   # a tenant's long prefill chunk: lowrank_dense.py
    add_dense_segments(y, x, long_segments, plan, projections, group_size)
    if meta is not None:
        # z and the expand's fp32 workspace share one buffer, which the shrink's first launch zeroes whole: a launch
        # fewer per call than zeroing each (every launch is a node of each captured decode graph). z's columns are
        # padded to a multiple of 16, so the workspace view starts 64-byte aligned and its row stride divides by 16
        # as y's width does: Triton specializes kernels on both, and a variant other than the one the engine warms
        # up at start would compile inside a request (bench/results/first_use.md).
        z_cols = -(-plan.z_width // 16) * 16
        zeroed = torch.empty(x.shape[0], z_cols + y.shape[1], dtype=torch.float32, device=x.device)
        z = shrink_triton(x, meta, plan, group_size, zeroed=zeroed)
        expand_triton(y, z, meta, plan, group_size, ws=zeroed[:, z_cols:])


def add_lowrank_delta_reference(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata,
                                projections: list[LowRankProjection], group_size: int) -> None:
    check_lowrank_call(y, x, meta.num_rows, meta.num_slots, meta.row_slots.device, projections, group_size)
    expand_reference(y, shrink_reference(x, meta, projections, group_size), meta, projections, group_size)


def add_lowrank_delta(y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata, projections: list[LowRankProjection],
                      group_size: int, use_triton: bool | None = None, plan: LowRankPlan | None = None) -> None:
    """y [B, D_out_total] += per row, per projection p: sum over tiers of x @ v^T diag(s) u at the row's slot.

    Equivalent loop:
        for row, slot in enumerate(row_slots):
            if slot >= 0:
                for p in projections:
                    y[row, p.out_offset : p.out_offset + p.d_out] += sum(
                        (x[row] @ v_t[slot].T * s_t[slot]) @ u_t[slot] for t in p.tiers)   # fp32, one rounding
    x [B, d_in] and y share a dtype (fp16, bf16, fp32). use_triton None: CUDA tensors run the Triton kernels,
    others the PyTorch reference; False forces the reference (a baseline). plan: lowrank_plan_for(projections),
    built once by the caller (else built here at every call, a dictionary look-up of every buffer address).
    With static metadata (SlotMetadata.from_host(..., pad_to=B)) the Triton path reads nothing from the host
    that changes per step and uploads nothing, so it can be captured in a CUDA graph (after one warm-up call,
    which compiles and autotunes) and replayed after meta.copy_(next step's metadata).
    """
    if x.is_cuda if use_triton is None else use_triton:
        add_lowrank_delta_triton(y, x, meta, projections, group_size, plan)
    else:
        add_lowrank_delta_reference(y, x, meta, projections, group_size)
