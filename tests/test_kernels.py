"""Triton delta kernels vs their PyTorch references (TRITON_INTERPRET=1 on CPU), and the references vs dense math.

Inputs are fresh random draws each run (the seed is in every failure message); y starts as random values, so
an element the kernel writes wrongly or a base row it touches shows up as a difference from y0 + delta.
The public functions dispatch on device (CPU -> reference), so these tests call the Triton launchers directly.
"""
from __future__ import annotations

import secrets

import pytest
import torch

from deltaserve.delta_store.packing import dequantize, pack_bitplanes, quantize_groups
from deltaserve.kernels import LowRankProjection, PackedTierSlots, SlotMetadata, add_lowrank_delta, add_sign_delta
from deltaserve.kernels.lowrank_delta import add_lowrank_delta_reference, add_lowrank_delta_triton
from deltaserve.kernels.lowrank_plan import plan_for
from deltaserve.kernels.lowrank_shrink import shrink_reference, shrink_triton
from deltaserve.kernels.random_slots import random_signs, random_tier
from deltaserve.kernels.sign_delta import add_sign_delta_reference, add_sign_delta_triton

S, D_IN, G = 4, 75, 32  # d_in not a multiple of any block; two scale groups and a partial one
D_OUTS = (40, 33)  # stacked projections of odd widths
DTYPES = (torch.float16, torch.bfloat16)
ROW_CASES = {
    "batch_of_one": [2],
    "all_one_slot": [1] * 5,
    "all_base": [-1] * 4,
    "every_row_own_slot": [3, 0, 2, 1],
    "mixed_with_base": [2, -1, 0, 0, 3, 2, -1, 0, 1],
    "prefill_segments": [1] * 20 + [-1, 0, 0, 3] + [1] * 19,  # slot 1 spans two 32-row tiles
}


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def _projections(g: torch.Generator, bits: list[int] | None = None) -> list[LowRankProjection]:
    """Two stacked projections; tiers as in Delta-CoMe (few ranks at high bits, more at low), including a tier
    whose rank is 0 for some slots and one at rank 0 for all."""
    hi = bits or [8, 6, 7, 5]
    lo = bits or [2, 3, 1, 2]
    return [
        LowRankProjection(0, D_OUTS[0], [random_tier([2, 0, 1, 2], hi, 2, 8, D_IN, D_OUTS[0], G, g),
                                          random_tier([17, 3, 0, 20], lo, 20, max(lo), D_IN, D_OUTS[0], G, g)]),
        LowRankProjection(D_OUTS[0], D_OUTS[1], [random_tier([3, 1, 2, 3], hi, 3, 8, D_IN, D_OUTS[1], G, g),
                                                 random_tier([0, 0, 0, 0], [1] * S, 4, 1, D_IN, D_OUTS[1], G, g)]),
    ]


def _batch(rows: list[int], dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, SlotMetadata]:
    x = torch.randn(len(rows), D_IN, generator=g).to(dtype)
    y0 = (torch.randn(len(rows), sum(D_OUTS), generator=g) * 4).to(dtype)
    return x, y0, SlotMetadata.build(torch.tensor(rows, dtype=torch.int32), S)


def _assert_close(got: torch.Tensor, want: torch.Tensor, y0: torch.Tensor, rows: list[int], seed: int) -> None:
    """got == want up to one rounding of y's dtype (sums run in another order); base rows bit-identical to y0."""
    base = torch.tensor([s < 0 for s in rows])
    assert torch.equal(got[base], y0[base]), f"seed {seed}: base rows changed"
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}[got.dtype]
    err = (got.float() - want.float()).abs()
    tol = ulp * want.float().abs() + 1e-3
    assert bool((err <= tol).all()), f"seed {seed}: max error {err.max().item()} (dtype {got.dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROW_CASES)
def test_lowrank_kernel_matches_reference(case: str, dtype: torch.dtype, gen) -> None:
    g, seed = gen
    rows = ROW_CASES[case]
    projections = _projections(g)
    x, y0, meta = _batch(rows, dtype, g)
    want, got = y0.clone(), y0.clone()
    add_lowrank_delta_reference(want, x, meta, projections, G)
    add_lowrank_delta_triton(got, x, meta, projections, G)
    _assert_close(got, want, y0, rows, seed)
    if any(s >= 0 for s in rows):
        assert not torch.equal(want, y0), f"seed {seed}: the delta did nothing"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
def test_lowrank_kernel_every_bit_width(bits: int, dtype: torch.dtype, gen) -> None:
    g, seed = gen
    rows = ROW_CASES["mixed_with_base"]
    projections = _projections(g, bits=[bits] * S)
    x, y0, meta = _batch(rows, dtype, g)
    want, got = y0.clone(), y0.clone()
    add_lowrank_delta_reference(want, x, meta, projections, G)
    add_lowrank_delta_triton(got, x, meta, projections, G)
    _assert_close(got, want, y0, rows, seed)


def test_shrink_intermediate_is_fp32_and_matches(gen) -> None:
    """z (rank-r intermediate) stays fp32: compare it where the kernel writes it (rows with a slot, ranks in use)."""
    g, seed = gen
    rows = ROW_CASES["mixed_with_base"]
    projections = _projections(g)
    x, _, meta = _batch(rows, torch.float16, g)
    got = shrink_triton(x, meta, plan_for(projections), G)
    want = shrink_reference(x, meta, projections, G)
    assert got.dtype == torch.float32
    written = want != 0  # the reference writes zeros nowhere it computes: random inputs never give exactly 0
    torch.testing.assert_close(got[written], want[written], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROW_CASES)
def test_sign_kernel_matches_reference(case: str, dtype: torch.dtype, gen) -> None:
    g, seed = gen
    rows = ROW_CASES[case]
    projections = [random_signs(S, D_IN, D_OUTS[0], 0, g), random_signs(S, D_IN, D_OUTS[1], D_OUTS[0], g)]
    x, y0, meta = _batch(rows, dtype, g)
    want, got = y0.clone(), y0.clone()
    add_sign_delta_reference(want, x, meta, projections)
    add_sign_delta_triton(got, x, meta, projections)
    _assert_close(got, want, y0, rows, seed)


def test_reference_equals_dense_delta(gen) -> None:
    """The low-rank reference equals y += x @ (sum_t u_t^T diag(s_t) v_t)^T built from real quantized factors."""
    g, seed = gen
    d_out, tiers = 48, [(2, 8), (5, 3)]
    factors = []
    for r, b in tiers:
        (vc, vs), (uc, us) = (quantize_groups(torch.randn(r, d, generator=g), b, G) for d in (D_IN, d_out))
        factors.append((r, b, pack_bitplanes(vc, b), vs, pack_bitplanes(uc, b), us, torch.rand(r, generator=g) + 0.5))
    slot_tiers = [PackedTierSlots(v_planes=vp[None].repeat(2, 1, 1, 1), v_scales=vs[None].repeat(2, 1, 1),
                                  u_planes=up[None].repeat(2, 1, 1, 1), u_scales=us[None].repeat(2, 1, 1),
                                  s=s[None].repeat(2, 1), ranks=torch.tensor([r, 0], dtype=torch.int32),
                                  bits=torch.tensor([b, b], dtype=torch.int32))
                  for r, b, vp, vs, up, us, s in factors]
    dense = sum(dequantize(up, us, d_out, G).T @ torch.diag(s) @ dequantize(vp, vs, D_IN, G)
                for _, _, vp, vs, up, us, s in factors)
    x = torch.randn(3, D_IN, generator=g)
    y0 = torch.randn(3, d_out, generator=g)
    y = y0.clone()
    meta = SlotMetadata.build(torch.tensor([0, 1, 0]), 2)
    add_lowrank_delta(y, x, meta, [LowRankProjection(0, d_out, slot_tiers)], G)
    torch.testing.assert_close(y[[0, 2]], y0[[0, 2]] + x[[0, 2]] @ dense.T, msg=f"seed {seed}")
    assert torch.equal(y[1], y0[1]), f"seed {seed}: slot with rank 0 changed its row"


def test_sign_reference_equals_dense(gen) -> None:
    g, seed = gen
    p = random_signs(2, D_IN, 40, 0, g)
    x, y0 = torch.randn(2, D_IN, generator=g), torch.randn(2, 40, generator=g)
    y = y0.clone()
    add_sign_delta(y, x, SlotMetadata.build(torch.tensor([1, -1]), 2), [p])
    signs = torch.tensor([[(int(p.signs[1, o, i // 32]) >> (i % 32)) & 1 for i in range(D_IN)] for o in range(40)])
    torch.testing.assert_close(y[0], y0[0] + p.scales[1] * (x[0] @ (2.0 * signs - 1).T), msg=f"seed {seed}")
    assert torch.equal(y[1], y0[1])


def test_slot_metadata_groups_rows() -> None:
    meta = SlotMetadata.build(torch.tensor([2, -1, 0, 2, 0, 1]), 3)
    assert meta.seg_slots.tolist() == [0, 1, 2] and meta.seg_lens_host == (2, 1, 2)
    assert meta.sorted_rows.tolist() == [2, 4, 5, 0, 3] and meta.seg_starts.tolist() == [0, 2, 3]
    seg, start = meta.blocks(1)
    assert seg.tolist() == [0, 0, 1, 2, 2] and start.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [3, -2, 100])
def test_bad_slot_index_is_a_clear_error(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"row 1 has slot index {bad}, outside \[-1, 3\)"):
        SlotMetadata.build(torch.tensor([0, bad, 1]), 3)


def test_launchers_reject_inconsistent_inputs(gen) -> None:
    g, _ = gen
    projections = _projections(g)
    x, y, meta = _batch([0, 1, 2], torch.float16, g)
    with pytest.raises(ValueError, match="slot metadata is for 3 rows, the batch has 2"):
        add_lowrank_delta_triton(y[:2], x[:2], meta, projections, G)
    with pytest.raises(ValueError, match="built for 5 slots, buffer 0 holds 4"):
        add_lowrank_delta_triton(y, x, SlotMetadata.build(torch.tensor([0, 1, 4]), 5), projections, G)
    with pytest.raises(ValueError, match="must share a dtype"):
        add_lowrank_delta_triton(y.float(), x, meta, projections, G)
    with pytest.raises(ValueError, match=r"projections\[0\].tiers\[0\].v_planes has 3 on axis 3"):
        add_lowrank_delta_triton(torch.zeros(3, 73, dtype=torch.float16), torch.zeros(3, 100, dtype=torch.float16),
                                 meta, projections, G)
    with pytest.raises(ValueError, match="exceeds y's 50 columns"):
        add_lowrank_delta_triton(y[:, :50], x, meta, projections, G)
    with pytest.raises(ValueError, match="signs has 3 words per row, d_in=100 needs 4"):
        add_sign_delta_triton(y, torch.zeros(3, 100, dtype=torch.float16), meta, [random_signs(S, D_IN, 40, 0, g)])
    with pytest.raises(ValueError, match=r"slot 1: rank 3 outside \[0, 2\]"):
        random_tier([1, 3], [2, 2], 2, 3, D_IN, 40, G, g)
