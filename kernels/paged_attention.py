"""Paged decode attention (flash-decoding) with static shapes, so a decode step can be captured in a CUDA graph.

One query token per sequence attends over its context in a paged KV cache: the token at position p of sequence
i lives at row block_tables[i, p // block_size] * block_size + p % block_size of the flat caches.

Grid of the split kernel: (sequence, KV head, split). A program holds every query head of its KV head (the GQA
group, padded to 16 rows for tl.dot), so the group reads each K/V tile once, and walks its split of the context
BLOCK_N tokens at a time with an online softmax in fp32. Each sequence cuts its own context into num_splits
equal pieces (rounded up to BLOCK_N) on the device; programs past the context exit at once. With one split the
kernel writes the output itself; otherwise each split leaves its normalized partial output and log-sum-exp in
an fp32 workspace and a second kernel, grid (sequence, query head), combines them.

The grid, the split count and the workspace depend only on the shapes (B, H, KVH, D, max_blocks, block_size),
never on ctx_lens or block_tables, and the launcher never reads device values: no host sync.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .tuning import _interpreting, dot_dtype

LOG2E = 1.4426950408889634
MAX_SPLITS = 64           # the combine kernel holds [MAX_SPLITS, D] fp32 of one head in registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Shape-dependent ints are runtime and unspecialized, so one compile serves every batch size, split count and
# table width (a compile inside a request stalls every running sequence).
@triton.jit(do_not_specialize=["stride_bt", "stride_pb", "stride_ph", "NUM_SPLITS"])
def _split_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, ctx_lens_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_lens_ptr + seq)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)  # tokens, per sequence
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g                                                     # query heads of this group
    g_mask = offs_g < GROUP
    if start >= end:  # past the context (ctx 0 is a padding row): one split writes zeros, several leave it out
        if NUM_SPLITS == 1:
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     tl.zeros((GROUP_PAD, HEAD_DIM), dtype=out_ptr.dtype.element_ty), mask=g_mask[:, None])
        return

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None],
                other=0.0)                                                           # [GROUP_PAD, D]
    q = q.to(DOT_DTYPE)
    table = block_tables_ptr + seq * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)                    # running max, log2 units
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)                                  # running sum of exp2
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        rows = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE                # flat cache row of each token
        k = tl.load(k_head + rows[:, None] * stride_kt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))                                   # finite: a token is valid
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + rows[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = seq * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["stride_pb", "stride_ph", "NUM_SPLITS"])
def _combine_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, ctx_lens_ptr,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS, SPLITS_PAD: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    ctx = tl.load(ctx_lens_ptr + seq)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)  # as the split kernel
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < tl.cdiv(ctx, split_len)        # splits that ran; none for a padding row
    part = seq * stride_pb + head * stride_ph + offs_s * stride_ps
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))           # [SPLITS_PAD], log2 units
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)                                                       # 0 where no split ran
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w_sum = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(w_sum == 0.0, 1.0, w_sum)      # zeros for a padding row
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


def block_n_for(head_dim: int) -> int:
    """Context tokens per step of a program: 64 (32 at D=256) on the GPU, 16 in the interpreter."""
    if _interpreting():
        return 16
    return 64 if head_dim <= 128 else 32


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache  # a few us of host time per call otherwise
def decode_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, head_dim: int,
                  device: torch.device) -> int:
    """Splits per sequence, from shapes only: enough programs (sequences x KV heads x splits) for about two per
    SM, never more splits than BLOCK_N tiles in max_blocks * block_size tokens, at most MAX_SPLITS."""
    tiles = triton.cdiv(max_blocks * block_size, block_n_for(head_dim))
    if _interpreting() or device.type != "cuda":
        target = 16      # a few splits, to exercise the combine kernel on CPU
    else:
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(tiles, triton.cdiv(target, max(batch * kv_heads, 1)), MAX_SPLITS))


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_WORKSPACES = 64


def decode_workspace(batch: int, heads: int, num_splits: int, head_dim: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs [B, H, S, D] and log-sum-exps [B, H, S] of the splits, cached per shape and device
    (allocated once, then reused by every layer and step; the combine kernel reads only entries written in the
    same call). Calls on two streams at once with the same shapes would share it."""
    key = (str(device), batch, heads, num_splits, head_dim)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if len(_WORKSPACES) >= _MAX_WORKSPACES:
            _WORKSPACES.clear()
        ws = (torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=device),
              torch.empty(batch, heads, num_splits, dtype=torch.float32, device=device))
        _WORKSPACES[key] = ws
    return ws


def live_workspaces() -> list[torch.Tensor]:
    """Every cached workspace: a captured CUDA graph holds these so that none it writes is ever freed."""
    return [t for ws in _WORKSPACES.values() for t in ws]


def check_decode_call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      ctx_lens: torch.Tensor, block_size: int) -> None:
    """ValueError unless the shapes, dtypes and devices fit paged_decode_attention's contract (values unread)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    b, h, d = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not one of float16, bfloat16, float32")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two in [16, 256]")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[2] != d:
            raise ValueError(f"{name} must be [num_blocks * block_size, KVH, {d}], got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"{name} dtype {c.dtype} differs from q's {q.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    kvh = k_cache.shape[1]
    if kvh == 0 or h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    if not isinstance(block_size, int) or block_size <= 0 or k_cache.shape[0] % block_size:
        raise ValueError(f"block_size {block_size} must be a positive int dividing the {k_cache.shape[0]} cache rows")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{b}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if ctx_lens.shape != (b,) or ctx_lens.dtype != torch.int32:
        raise ValueError(f"ctx_lens must be int32 [{b}], got {ctx_lens.dtype} {tuple(ctx_lens.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, ctx_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, caches, block_tables and ctx_lens must share a device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int, scale: float, *,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """out [B, H, D] (q's dtype): per sequence i and query head h, with kv = h // (H // KVH),
        softmax(scale * q[i, h] @ K_i[:, kv].T) @ V_i[:, kv]     (fp32 softmax)
    where K_i / V_i are the cache rows of positions 0 .. ctx_lens[i] - 1; rows with ctx_lens[i] == 0 are zeros.

    q            [B, H, D]                      fp16 / bf16 / fp32, D a power of two in [16, 256]
    k_cache      [num_blocks * block_size, KVH, D], q's dtype; v_cache the same
    block_tables int32 [B, max_blocks]          entries past a sequence's blocks: any valid block index
    ctx_lens     int32 [B]                      tokens with KV, the new one included
    out          optional [B, H, D] q's dtype, last dim contiguous (a CUDA graph's static output)
    num_splits   optional override of decode_splits(...) (tests)
    Launches depend on shapes only: capturable in a CUDA graph with ctx_lens / block_tables updated in place.
    """
    check_decode_call(q, k_cache, v_cache, block_tables, ctx_lens, block_size)
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, contiguous in its last dimension")
    if b == 0:
        return out
    if block_tables.shape[1] == 0:
        return out.zero_()
    splits = num_splits or decode_splits(b, kvh, block_tables.shape[1], block_size, d, q.device)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {splits} outside [1, {MAX_SPLITS}]")
    block_n = block_n_for(d)
    group = h // kvh
    if splits > 1:
        part_out, part_lse = decode_workspace(b, h, splits, d, q.device)
    else:
        part_out = part_lse = out  # unused
    pstride = (h * splits, splits, 1)  # part_lse [B, H, S]; part_out rows are the same index times D
    _split_kernel[(b, kvh, splits)](
        out, part_out, part_lse, q, k_cache, v_cache, block_tables, ctx_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1), *pstride,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, NUM_SPLITS=splits, DOT_DTYPE=dot_dtype(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        _combine_kernel[(b, h)](
            out, part_out, part_lse, ctx_lens,
            out.stride(0), out.stride(1), *pstride,
            HEAD_DIM=d, BLOCK_N=block_n, NUM_SPLITS=splits, SPLITS_PAD=MAX_SPLITS,  # one compile for every split count
            num_warps=4,
        )
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int,
                                     scale: float) -> torch.Tensor:
    """The spec of paged_decode_attention in plain PyTorch: gather each sequence's rows, fp32 softmax."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    out = torch.zeros_like(q)
    for i, n in enumerate(ctx_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        rows = block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_cache[rows].float().repeat_interleave(h // kvh, dim=1)               # [n, H, D]
        v = v_cache[rows].float().repeat_interleave(h // kvh, dim=1)
        att = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", att, v).to(q.dtype)
    return out

