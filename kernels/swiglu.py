"""SwiGLU's activation, silu(gate) * up, from the fused gate|up projection's output in one launch.

In torch it is two launches and an intermediate the size of the MLP's hidden rows (silu, then the product); fused,
each element is read once and written once. Rounding follows the torch ops: silu in fp32 rounded to the input's
dtype, then the product rounded once (exact in fp32 for fp16/bf16 operands, see kernels/rms_norm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, width, stride_in, stride_out, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=inside)


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up: expected [T, 2 * width] with contiguous columns, got {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2 * width] (gate then up, as the fused projection writes them) -> silu(gate) * up [T, width],
    into `out` if given (contiguous, that shape and gate_up's dtype)."""
    _check(gate_up)
    t, width = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(t, width, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (t, width) or out.dtype != gate_up.dtype or not out.is_contiguous():
        raise ValueError(f"out: contiguous {gate_up.dtype} [{t}, {width}] expected, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if t and width:
        _silu_mul_kernel[(t, triton.cdiv(width, BLOCK))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                         BLOCK=BLOCK, num_warps=4)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul in torch ops (the engine's path off CUDA)."""
    _check(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
