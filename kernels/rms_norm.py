"""RMSNorm with the residual add before it and each row's tenant weight delta, in one launch.

A Llama layer adds a sublayer's output into the residual stream and normalizes the sum for the next sublayer; the
norm's weight is the base weight plus the row's tenant delta (full fine-tunes change norm weights too). In torch
that is an add, the norm, a gather of the rows' deltas, its masking, the weight add and the product: up to six
launches of a few microseconds each on a few KB, twice a layer, which a decode step spends more time launching
than moving bytes (as vLLM's fused_add_rms_norm). One program per row does it all.

Rounding follows the torch ops it replaces, so the engine's CPU path (the reference below) and the GPU kernel agree
to the last bit but for the norm's fp32 sum order: the sum x + residual rounds to x's dtype, the norm is taken in
fp32 and rounds to x's dtype, the merged weight (w + delta) rounds to the weight's dtype, and their product rounds
once. (A product or sum of two fp16/bf16 values is exact in fp32 or rounds there past the half-ulp that decides its
rounding to 16 bits, so fp32 arithmetic then one rounding gives the 16-bit op's bits.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, delta_ptr, slots_ptr, out_ptr, sum_ptr, h, eps, stride_x, stride_r,
                         stride_o, stride_s, stride_d, HAS_RESIDUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < h
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=inside, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=inside)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / h + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        slot = tl.load(slots_ptr + row)
        d = tl.load(delta_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_d + cols, mask=inside, other=0.0)
        w = (w.to(tl.float32) + tl.where(slot >= 0, d.to(tl.float32), 0.0)).to(w.dtype)  # -1: the base weight
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed).to(out_ptr.dtype.element_ty), mask=inside)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, deltas: torch.Tensor | None,
           row_slots: torch.Tensor | None) -> None:
    t, h = x.shape
    if weight.shape != (h,) or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x [T, {weight.shape[0]}] (contiguous columns) and a contiguous weight expected, got x "
                         f"{tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                         f"{tuple(residual.shape)} strides {residual.stride()}")
    if deltas is not None:
        if row_slots is None or row_slots.shape != (t,) or row_slots.dtype != torch.int32:
            raise ValueError("deltas need row_slots, int32 [T] (-1 = base)")
        if deltas.dim() != 2 or deltas.shape[1] != h or deltas.stride(1) != 1:
            raise ValueError(f"deltas: expected [slots, {h}] with contiguous columns, got {tuple(deltas.shape)}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 deltas: torch.Tensor | None = None, row_slots: torch.Tensor | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s) * (weight + deltas[slot of row]), s) with s = x + residual (x when residual is None), in one
    launch. x, residual [T, h]; weight [h]; deltas [slots, h] with row_slots int32 [T], -1 = the base weight.
    Row slots must be < deltas.shape[0] (the engine's slot bank guarantees it; the kernel reads without a check).
    out: the two result tensors to write (contiguous, x's shape and dtype; the second unused without residual)."""
    _check(x, residual, weight, deltas, row_slots)
    t, h = x.shape
    if out is not None and any(o.shape != x.shape or o.dtype != x.dtype or not o.is_contiguous() for o in out):
        raise ValueError(f"out: two contiguous {x.dtype} {tuple(x.shape)} tensors expected")
    normed = out[0] if out is not None else torch.empty_like(x)
    s = x if residual is None else out[1] if out is not None else torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(h)
        _add_rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, deltas if deltas is not None else weight,
            row_slots if row_slots is not None else x, normed, s, h, eps, x.stride(0),
            residual.stride(0) if residual is not None else 0, normed.stride(0), s.stride(0),
            deltas.stride(0) if deltas is not None else 0, HAS_RESIDUAL=residual is not None,
            HAS_DELTA=deltas is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16))
    return normed, s


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           deltas: torch.Tensor | None = None, row_slots: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm in torch ops (the engine's path off CUDA): on CPU F.rms_norm gives transformers' bits."""
    _check(x, residual, weight, deltas, row_slots)
    s = x if residual is None else x + residual
    w = weight
    if deltas is not None:
        base = (row_slots < 0)[:, None]
        w = weight + deltas.index_select(0, row_slots.clamp(min=0)).masked_fill(base, 0)
    return w * F.rms_norm(s, (s.shape[-1],), eps=eps), s
