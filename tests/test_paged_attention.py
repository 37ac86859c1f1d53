"""Paged decode attention: the Triton kernel (TRITON_INTERPRET=1 on CPU) vs its PyTorch reference, the reference vs
the engine's paged_attention, and (GPU only) capture in a CUDA graph then replay with new contexts.

Inputs are fresh random draws each run (the seed is in every failure message); outputs and the split workspace
start as NaN, so any element the kernels fail to write shows up.
"""
from __future__ import annotations

import secrets

import pytest
import torch

from deltaserve.engine.attention import AttentionMetadata, DecodeAttention, paged_attention
from deltaserve.kernels.paged_attention import (decode_splits, decode_workspace, paged_decode_attention,
                                                paged_decode_attention_reference)

D = 32
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def _inputs(ctx_lens: list[int], h: int, kvh: int, block_size: int, dtype: torch.dtype, g: torch.Generator,
            spare_blocks: int = 3, device: str = "cpu", d: int = D):
    """q, caches and a shuffled block table: each sequence owns distinct random blocks of a cache with spare ones;
    table entries past a sequence's blocks are random valid indices (never read)."""
    max_blocks = max(-(-n // block_size) for n in ctx_lens) + 1
    num_blocks = sum(-(-n // block_size) for n in ctx_lens) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), generator=g, dtype=torch.int32)
    used = 0
    for i, n in enumerate(ctx_lens):
        k = -(-n // block_size)
        tables[i, :k] = perm[used:used + k]
        used += k
    q = torch.randn(len(ctx_lens), h, d, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks * block_size, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kvh, d, generator=g).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, tables, ctx)]


def _run(args, block_size: int, num_splits: int | None = None) -> torch.Tensor:
    """The kernel with its output and every cached split workspace poisoned with NaN first."""
    q, k_cache, _, tables, _ = args
    splits = num_splits or decode_splits(q.shape[0], k_cache.shape[1], tables.shape[1], block_size, D, q.device)
    if splits > 1:
        for t in decode_workspace(q.shape[0], q.shape[1], splits, D, q.device):
            t.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(*args, block_size, D ** -0.5, out=out, num_splits=num_splits)
    assert res is out
    return out


def _check(got: torch.Tensor, want: torch.Tensor, seed: int) -> None:
    assert not got.isnan().any(), f"seed {seed}: NaN in the output"
    tol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa8"])
def test_kernel_matches_reference(heads: tuple[int, int], block_size: int, dtype: torch.dtype, gen) -> None:
    """Lengths 1, an exact multiple of block_size, a padding row, and long ones that span several splits."""
    g, seed = gen
    h, kvh = heads
    ctx_lens = [1, 3 * block_size, 0, 77, int(torch.randint(2, 80, (1,), generator=g))]
    args = _inputs(ctx_lens, h, kvh, block_size, dtype, g)
    want = paged_decode_attention_reference(*args, block_size, D ** -0.5)
    got = _run(args, block_size)
    _check(got, want, seed)
    assert torch.equal(got[2], torch.zeros_like(got[2])), f"seed {seed}: padding row is not zeros"


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_every_split_count(num_splits: int, gen) -> None:
    """Forced split counts: one (direct write), a split of several BLOCK_N tiles, splits past a short context."""
    g, seed = gen
    ctx_lens = [0, 1, 16, 130, 47]
    args = _inputs(ctx_lens, 4, 2, 16, torch.float32, g)
    got = _run(args, 16, num_splits)
    _check(got, paged_decode_attention_reference(*args, 16, D ** -0.5), seed)
    assert torch.equal(got[0], torch.zeros_like(got[0])), f"seed {seed}: padding row is not zeros"


def test_strided_q_and_all_padding(gen) -> None:
    """q as a view into a fused qkv row (strided heads); a batch of padding rows only."""
    g, seed = gen
    q, k_cache, v_cache, tables, ctx = _inputs([5, 33], 4, 2, 4, torch.float16, g)
    qkv = torch.randn(2, 8, D, generator=g).to(torch.float16)
    qkv[:, :4] = q
    args = [qkv[:, :4], k_cache, v_cache, tables, ctx]
    _check(_run(args, 4), paged_decode_attention_reference(*args, 4, D ** -0.5), seed)
    args[4] = torch.zeros(2, dtype=torch.int32)
    assert torch.equal(_run(args, 4), torch.zeros_like(q))


def test_reference_matches_engine_attention(gen) -> None:
    """The reference and engine/attention.py's paged_attention agree on a decode-only batch (q_lens all 1)."""
    g, seed = gen
    block_size, h, kvh = 4, 8, 2
    ctx_lens = [1, 8, 13, 30]
    q, k_cache, v_cache, tables, ctx = _inputs(ctx_lens, h, kvh, block_size, torch.float32, g)
    lists = [tables[i, :-(-n // block_size)].tolist() for i, n in enumerate(ctx_lens)]
    meta = AttentionMetadata.build([1] * len(ctx_lens), ctx_lens, lists, block_size, torch.device("cpu"))
    engine = paged_attention(q, k_cache, v_cache, meta, D ** -0.5)
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables, ctx, block_size, D ** -0.5)
    torch.testing.assert_close(engine.view_as(q), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_bad_inputs_raise(gen) -> None:
    g, _ = gen
    q, k, v, tables, ctx = _inputs([3, 9], 4, 2, 4, torch.float16, g)
    s = D ** -0.5
    cases = [
        ((q[..., :24], k[..., :24], v[..., :24], tables, ctx, 4, s), "power of two"),
        ((q[0], k, v, tables, ctx, 4, s), r"q must be \[B, H, D\]"),
        ((q.int(), k.int(), v.int(), tables, ctx, 4, s), "not one of"),
        ((q, k.float(), v, tables, ctx, 4, s), "k_cache dtype"),
        ((q[:, :3], k, v, tables, ctx, 4, s), "not a multiple of 2 KV heads"),
        ((q, k, v[:-4], tables, ctx, 4, s), "differ in shape"),
        ((q, k, v, tables.long(), ctx, 4, s), "block_tables must be int32"),
        ((q, k, v, tables[:1], ctx, 4, s), "block_tables must be int32"),
        ((q, k, v, tables, ctx[:1], 4, s), "ctx_lens must be int32"),
        ((q, k, v, tables, ctx.long(), 4, s), "ctx_lens must be int32"),
        ((q, k, v, tables, ctx, 3, s), "block_size 3"),
        ((q, k.transpose(1, 2).contiguous().transpose(1, 2), v, tables, ctx, 4, s), "contiguous"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            paged_decode_attention(*args)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, k, v, tables, ctx, 4, s, out=torch.empty_like(q, dtype=torch.float32))
    with pytest.raises(ValueError, match="num_splits 99"):
        paged_decode_attention(q, k, v, tables, ctx, 4, s, num_splits=99)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_graph_replay_with_new_contexts(dtype: torch.dtype, gen) -> None:
    """Capture once, then change ctx_lens and block_tables in place (longer, shorter, padding) and replay."""
    g, seed = gen
    block_size, h, kvh, d = 16, 32, 8, 128
    q, k_cache, v_cache, tables, ctx = _inputs([1, 700, 2048, 33], h, kvh, block_size, dtype, g, spare_blocks=200,
                                               device="cuda", d=d)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, tables, ctx, block_size, d ** -0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        paged_decode_attention(*args, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, out=out)
    num_blocks = k_cache.shape[0] // block_size
    for lens in ([2048, 0, 5, 1500], [17, 2000, 0, 1], [1, 1, 1, 1]):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        tables.copy_(torch.randint(0, num_blocks, tables.shape, generator=g, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=g).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        _check(out, paged_decode_attention_reference(*args), seed)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_masked_sdpa_matches_fp32_math(device: str, heads: int, kv_heads: int, gen) -> None:
    """The prefill attention (no cuDNN, grouped key/value heads repeated on CUDA) equals fp32 math attention, for
    sequences of unequal contexts under a causal mask."""
    from deltaserve.engine.attention import masked_sdpa
    g, seed = gen
    n, max_q, max_ctx = 3, 5, 11
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(n, heads, max_q, D, generator=g).to(device, dtype)
    k = torch.randn(n, kv_heads, max_ctx, D, generator=g).to(device, dtype)
    v = torch.randn(n, kv_heads, max_ctx, D, generator=g).to(device, dtype)
    ctx = torch.tensor([11, 7, 5], device=device)  # every query sees at least key 0
    pos = (ctx - max_q)[:, None] + torch.arange(max_q, device=device)[None, :]
    mask = (torch.arange(max_ctx, device=device)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
    got = masked_sdpa(q, k, v, mask, D ** -0.5).float()
    group = heads // kv_heads
    scores = (q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)) * D ** -0.5
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.float().repeat_interleave(group, 1)
    assert (got - want).abs().max().item() < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("pad_to, max_blocks", [(5, 3), (8, 7), (16, 33)])
def test_decode_attention_build(pad_to: int, max_blocks: int, gen) -> None:
    """DecodeAttention.build: each row's block table zero-padded to max_blocks, padding rows (context 0) writing
    to the scratch row, and every device view 16-byte aligned (Triton specializes on pointer alignment)."""
    g, seed = gen
    block_size, n = 4, pad_to - 2
    ctx_lens = torch.randint(1, block_size * max_blocks + 1, (n,), generator=g).tolist()
    tables = [torch.randint(0, 1000, (-(-c // block_size),), generator=g).tolist() for c in ctx_lens]
    meta = DecodeAttention.build(ctx_lens, tables, block_size, pad_to, max_blocks, 4242, torch.device("cpu"))
    want_tables = torch.zeros(pad_to, max_blocks, dtype=torch.int32)
    for row, t in enumerate(tables):
        want_tables[row, : len(t)] = torch.tensor(t)
    assert torch.equal(meta.block_tables, want_tables), f"seed {seed}"
    assert meta.ctx_lens.tolist() == ctx_lens + [0, 0] and meta.ctx_lens.dtype == torch.int32, f"seed {seed}"
    assert meta.positions.tolist() == [c - 1 for c in ctx_lens] + [0, 0]
    assert meta.slot_mapping.tolist() == [t[(c - 1) // block_size] * block_size + (c - 1) % block_size
                                          for c, t in zip(ctx_lens, tables)] + [4242, 4242]
    for view in (meta.block_tables, meta.ctx_lens, meta.positions, meta.slot_mapping):
        assert view.data_ptr() % 16 == 0 and view.is_contiguous()
