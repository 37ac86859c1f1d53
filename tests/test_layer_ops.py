"""The decoder layer's fused ops (kernels/rms_norm.py, swiglu.py, rotary_cache.py): each Triton kernel against its
PyTorch reference (TRITON_INTERPRET=1 on CPU; on CUDA as well where there is one), on fresh random inputs (the
seed is in every failure message), with every output poisoned with NaN first so an unwritten element shows up.

The references are the torch ops the engine ran before the fusion and still runs off CUDA; the kernels round like
them, so sums and rotations must match to the bit and the norm to within its fp32 summation order.
"""
from __future__ import annotations

import os
import secrets

import pytest
import torch

from deltaserve.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from deltaserve.kernels.rotary_cache import rotary_cache, rotary_cache_reference
from deltaserve.kernels.swiglu import silu_mul, silu_mul_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# CPU under TRITON_INTERPRET=1 (make test); CUDA on the GPU machine (pytest -m gpu)
DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []
DEVICES += [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
# one unit in the last place at 1.0 (2^-23, 2^-10, 2^-7)
ULP = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.9e-3}


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _nan(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def _interpreted_bf16(t: torch.Tensor) -> bool:
    """The Triton interpreter converts fp32 to bf16 by another rounding than torch's round-to-nearest-even (one
    ulp apart at times, at each of an op's roundings): there bits cannot match."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str, seed: int, compiled_ulps: int = 0) -> None:
    """Bit equality, but for interpreted bf16 an ulp at each of up to three roundings, and compiled (CUDA)
    `compiled_ulps` ulps of the result or of the products before it (inputs of magnitude up to ~4)."""
    ulps = 3 if _interpreted_bf16(got) else compiled_ulps if got.is_cuda else 0
    if ulps:
        atol = ulps * ULP[got.dtype] * (4 if got.is_cuda else 1)
        torch.testing.assert_close(got, want, rtol=ulps * ULP[got.dtype], atol=atol,
                                   msg=lambda m: f"seed {seed}: {what}: {m}")
    else:
        assert torch.equal(got, want), f"seed {seed}: {what} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_deltas", [False, True])
def test_add_rms_norm_matches_reference(device: str, dtype: torch.dtype, with_residual: bool, with_deltas: bool,
                                        gen) -> None:
    """Odd hidden size (not a power of two: masked lanes), rows on the base (-1) and on several slots."""
    g, seed = gen
    t, h, slots = 6, 200, 3
    x = _randn(g, t, h, dtype=dtype, device=device) * 3
    residual = _randn(g, t, h, dtype=dtype, device=device) if with_residual else None
    weight = 1 + _randn(g, h, dtype=dtype, device=device) * 0.1
    deltas = _randn(g, slots, h, dtype=dtype, device=device) * 0.05 if with_deltas else None
    row_slots = torch.tensor([-1, 0, 2, 1, -1, 2], dtype=torch.int32, device=device) if with_deltas else None
    out = (_nan(x), _nan(x))
    got, got_sum = add_rms_norm(x, residual, weight, 1e-5, deltas, row_slots, out=out)
    want, want_sum = add_rms_norm_reference(x, residual, weight, 1e-5, deltas, row_slots)
    assert got is out[0]
    _assert_same_bits(got_sum, want_sum, "x + residual", seed)
    if not with_residual:
        assert got_sum is x
    # The norm's fp32 sum order differs from torch's: its rounding to the dtype may flip by one ulp, and the
    # product's rounding after it by one more (interpreted bf16: the sum's rounding as well, see _interpreted_bf16).
    # In fp32 the sum order and rsqrt move the last few bits themselves.
    ulps = 4 if _interpreted_bf16(got) else 2
    rtol = max(ulps * ULP[dtype], 1e-6)
    torch.testing.assert_close(got, want, rtol=rtol, atol=max(ULP[dtype], 1e-6), msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(device: str, dtype: torch.dtype, gen) -> None:
    """A width past one block and not a multiple of it."""
    g, seed = gen
    gate_up = _randn(g, 3, 2 * 1500, dtype=dtype, device=device) * 4
    out = _nan(gate_up[:, :1500].contiguous())
    got = silu_mul(gate_up, out=out)
    assert got is out
    # exp's last bits may differ from torch's (a few fp32 ulps: one 16-bit ulp after rounding, at most)
    torch.testing.assert_close(got, silu_mul_reference(gate_up), rtol=4 * ULP[dtype], atol=ULP[dtype],
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 24])
def test_rotary_cache_matches_reference(device: str, dtype: torch.dtype, head_dim: int, gen) -> None:
    """GQA (4 query heads on 2 KV heads); a head dim whose half is not a power of two; tokens written to shuffled
    cache rows, every other row left as it was."""
    g, seed = gen
    t, heads, kv_heads, rows = 5, 4, 2, 16
    qkv = _randn(g, t, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    angles = torch.rand(t, head_dim // 2, generator=g) * 100
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype).to(device)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype).to(device)
    slot_mapping = torch.randperm(rows, generator=g)[:t].to(device)
    caches = [_nan(torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device)) for _ in range(4)]
    q = torch.full((t, heads, head_dim), float("nan"), dtype=dtype, device=device)
    got = rotary_cache(qkv, cos, sin, caches[0], caches[1], slot_mapping, heads, q=q)
    want = rotary_cache_reference(qkv, cos, sin, caches[2], caches[3], slot_mapping, heads)
    assert got is q
    # Compiled, the rotation came out up to an ulp of its products from torch's in a few elements on the H100, fp32
    # too (likely the compiler fusing a product into the sum, an FMA, which the interpreter never does).
    _assert_same_bits(got, want, "rotated q", seed, compiled_ulps=1)
    for mine, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        _assert_same_bits(mine[slot_mapping], theirs[slot_mapping], "cache rows", seed, compiled_ulps=1)
        untouched = torch.ones(rows, dtype=torch.bool, device=device)
        untouched[slot_mapping] = False
        assert mine[untouched].isnan().all(), f"seed {seed}: a row outside slot_mapping was written"


def test_bad_inputs_raise(gen) -> None:
    g, _ = gen
    x = _randn(g, 2, 8, dtype=torch.float16, device="cpu")
    w = _randn(g, 8, dtype=torch.float16, device="cpu")
    slots = torch.zeros(2, dtype=torch.int32)
    norm_cases = [
        ((x, None, w[:4], 1e-5), "weight"),
        ((x, x.float(), w, 1e-5), "residual must match"),
        ((x, None, w, 1e-5, _randn(g, 2, 8, dtype=torch.float16, device="cpu"), None), "row_slots"),
        ((x, None, w, 1e-5, _randn(g, 2, 8, dtype=torch.float16, device="cpu"), slots.long()), "row_slots"),
        ((x, None, w, 1e-5, _randn(g, 2, 6, dtype=torch.float16, device="cpu"), slots), "deltas"),
    ]
    for args, match in norm_cases:
        for fn in (add_rms_norm, add_rms_norm_reference):
            with pytest.raises(ValueError, match=match):
                fn(*args)
    with pytest.raises(ValueError, match="out"):
        add_rms_norm(x, None, w, 1e-5, out=(x.float(), x))
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(x[:, :7])
    with pytest.raises(ValueError, match="out"):
        silu_mul(x, out=x)
    qkv = _randn(g, 2, 4 * 8, dtype=torch.float16, device="cpu")         # 2 heads + 2 x 1 KV head of 8
    cache = torch.zeros(4, 1, 8, dtype=torch.float16)
    cs = _randn(g, 2, 8, dtype=torch.float16, device="cpu")
    mapping = torch.tensor([0, 3])
    rotary_cases = [
        ((qkv[:, :24], cs, cs, cache, cache.clone(), mapping, 2), "qkv"),
        ((qkv, cs, cs, cache, cache[:2].clone(), mapping, 2), "one shape"),
        ((qkv, cs.float(), cs, cache, cache.clone(), mapping, 2), "one dtype"),
        ((qkv, cs[:1], cs[:1], cache, cache.clone(), mapping, 2), "cos and sin"),
        ((qkv, cs, cs, cache, cache.clone(), mapping.int(), 2), "slot_mapping"),
    ]
    for args, match in rotary_cases:
        for fn in (rotary_cache, rotary_cache_reference):
            with pytest.raises(ValueError, match=match):
                fn(*args)
