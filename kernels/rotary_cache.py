"""Rotary embedding of q and k from the fused qkv projection, and the step's k and v written into the paged KV
cache, in one launch.

In torch the rotation is a concatenation of the negated halves, two products and a sum (five launches), and the
cache writes two index copies: seven launches a layer of a few KB each, which a decode step spends more time
launching than moving bytes. Here one program per (token, head) rotates its head; a KV head's program also puts
the rotated k and the v head into the cache row of the token's slot. Rounding follows the torch ops (each product
and the sum round to the dtype; see kernels/rms_norm.py on why fp32 arithmetic then one rounding gives those bits):
the interpreter gives torch's bits; compiled, a few elements came out up to an ulp of the products away on the
H100, fp32 too (likely the compiler fusing a product into the sum, an FMA; tests/test_layer_ops.py).

Layout: rotate-half (GPT-NeoX, as transformers' Llama): element i < D/2 pairs with i + D/2. Caches are
[num_blocks * block_size, KVH, D]; slot_mapping holds each token's flat cache row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_cache_ptr, v_cache_ptr, stride_t,
                         stride_cs, stride_q, stride_cache, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    t, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_PAD)
    inside = offs < half
    src = qkv_ptr + t * stride_t + head * HEAD_DIM
    x1 = tl.load(src + offs, mask=inside, other=0.0)
    x2 = tl.load(src + half + offs, mask=inside, other=0.0)
    dtype = x1.dtype
    cs = cos_ptr + t * stride_cs
    sn = sin_ptr + t * stride_cs
    c1 = tl.load(cs + offs, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(cs + half + offs, mask=inside, other=0.0).to(tl.float32)
    s1 = tl.load(sn + offs, mask=inside, other=0.0).to(tl.float32)
    s2 = tl.load(sn + half + offs, mask=inside, other=0.0).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a * c1).to(dtype).to(tl.float32) + (-b * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((b * c2).to(dtype).to(tl.float32) + (a * s2).to(dtype).to(tl.float32)).to(dtype)
    if head < NUM_HEADS:
        dst = q_ptr + t * stride_q + head * HEAD_DIM
    else:
        kv_head = head - NUM_HEADS
        row = tl.load(slots_ptr + t) * stride_cache + kv_head * HEAD_DIM
        dst = k_cache_ptr + row
        v_src = qkv_ptr + t * stride_t + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        tl.store(v_cache_ptr + row + offs, tl.load(v_src + offs, mask=inside), mask=inside)
        tl.store(v_cache_ptr + row + half + offs, tl.load(v_src + half + offs, mask=inside), mask=inside)
    tl.store(dst + offs, o1, mask=inside)
    tl.store(dst + half + offs, o2, mask=inside)


def _check(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor, num_heads: int) -> tuple[int, int]:
    """(KV heads, head dim) after checking every argument."""
    t = qkv.shape[0]
    _, kv_heads, d = k_cache.shape
    if v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"k_cache and v_cache: contiguous [rows, KVH, D] of one shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * kv_heads) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv: expected [T, ({num_heads} + 2 x {kv_heads}) x {d}] with contiguous columns, got "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}")
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"qkv {qkv.dtype}, caches {k_cache.dtype}/{v_cache.dtype} and cos/sin {cos.dtype}/{sin.dtype}"
                         " must share one dtype")
    if cos.shape != (t, d) or sin.shape != (t, d) or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos and sin: [T, {d}] of one layout, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [{t}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    return kv_heads, d


def rotary_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                 q: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) D]; cos, sin [T, D] at each token's position; caches [rows, KVH, D]; slot_mapping int64
    [T] of cache rows (< rows: the engine's block manager guarantees it, the kernel reads without a check).
    Writes rotated k and v into the caches and returns rotated q [T, H, D] (into `q` if given, contiguous)."""
    kv_heads, d = _check(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
    t = qkv.shape[0]
    if q is None:
        q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    elif q.shape != (t, num_heads, d) or q.dtype != qkv.dtype or not q.is_contiguous():
        raise ValueError(f"q: contiguous {qkv.dtype} [{t}, {num_heads}, {d}] expected, got {q.dtype} "
                         f"{tuple(q.shape)}")
    if t:
        _rotary_cache_kernel[(t, num_heads + kv_heads)](
            qkv, cos, sin, slot_mapping, q, k_cache, v_cache, qkv.stride(0), cos.stride(0), q.stride(0),
            k_cache.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=kv_heads, HEAD_DIM=d,
            HALF_PAD=triton.next_power_of_2(d // 2), num_warps=1)
    return q


def rotary_cache_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """rotary_cache in torch ops (the engine's path off CUDA)."""
    kv_heads, d = _check(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
    t, heads = qkv.shape[0], num_heads + kv_heads
    x = qkv[:, : heads * d].view(t, heads, d)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    qk = x * cos[:, None] + rotated * sin[:, None]
    # index_copy_: several times faster on CPU than advanced-index assignment
    k_cache.index_copy_(0, slot_mapping, qk[:, num_heads:])
    v_cache.index_copy_(0, slot_mapping, qkv[:, heads * d :].view(t, kv_heads, d))
    return qk[:, :num_heads]
