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
from deltaserve.kernels.activation_quant import quantize_rows, quantize_rows_reference
from deltaserve.kernels.bitplanes import UNPACK_NAMES
from deltaserve.kernels import LowRankProjection, PackedTierSlots, SlotMetadata, add_lowrank_delta, add_sign_delta
from deltaserve.kernels.lowrank_delta import add_lowrank_delta_reference, add_lowrank_delta_triton
from deltaserve.kernels import lowrank_delta, lowrank_dense
from deltaserve.kernels.lowrank_dense import dequantized_factors, dequantized_factors_reference
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_expand import expand_triton
from deltaserve.kernels.lowrank_shrink import shrink_reference, shrink_triton
from deltaserve.kernels.random_slots import random_signs, random_tier
from deltaserve.kernels.sign_delta import add_sign_delta_reference, add_sign_delta_triton, sign_plan_for
from deltaserve.kernels.slot_metadata import static_tile_count
from deltaserve.kernels.tuning import KERNELS, forced_unpack

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
    # slot 3's 66 rows take the dense path (at the tests' threshold, see dense_threshold), the rest the kernels
    "long_segment_dense": [3] * 30 + [0, -1, 1, 1] + [3] * 36,
}
DENSE_MIN_ROWS = 64  # the dense path's threshold in these tests: 66 rows reach it, and the interpreter stays quick


@pytest.fixture(autouse=True)
def dense_threshold(monkeypatch) -> None:
    monkeypatch.setattr(lowrank_delta, "DENSE_MIN_ROWS", DENSE_MIN_ROWS)


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


@pytest.fixture(params=UNPACK_NAMES)
def unpack(request) -> str:
    """Runs the test with every bit-plane unpacking strategy a GPU's config table can pick."""
    with forced_unpack(request.param):
        yield request.param


def _projections(g: torch.Generator, bits: list[int] | None = None, group_size: int = G) -> list[LowRankProjection]:
    """Two stacked projections; tiers as in Delta-CoMe (few ranks at high bits, more at low), including a tier
    whose rank is 0 for some slots and one at rank 0 for all."""
    hi = bits or [8, 6, 7, 5]
    lo = bits or [2, 3, 1, 2]
    gs = group_size
    return [
        LowRankProjection(0, D_OUTS[0], [random_tier([2, 0, 1, 2], hi, 2, 8, D_IN, D_OUTS[0], gs, g),
                                          random_tier([17, 3, 0, 20], lo, 20, max(lo), D_IN, D_OUTS[0], gs, g)]),
        LowRankProjection(D_OUTS[0], D_OUTS[1], [random_tier([3, 1, 2, 3], hi, 3, 8, D_IN, D_OUTS[1], gs, g),
                                                 random_tier([0, 0, 0, 0], [1] * S, 4, 1, D_IN, D_OUTS[1], gs, g)]),
    ]


def _batch(rows: list[int], dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, SlotMetadata]:
    x = torch.randn(len(rows), D_IN, generator=g).to(dtype)
    y0 = (torch.randn(len(rows), sum(D_OUTS), generator=g) * 4).to(dtype)
    return x, y0, SlotMetadata.build(torch.tensor(rows, dtype=torch.int32), S)


ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}


def _assert_close(got: torch.Tensor, want: torch.Tensor, y0: torch.Tensor, rows: list[int], seed: int,
                  lowrank: bool = False) -> None:
    """got == want up to one rounding of y's dtype (sums run in another order); base rows bit-identical to y0.
    lowrank: add_lowrank_delta_triton's output, whose rows in a segment long enough for the dense path
    (lowrank_dense) went through factors and z rounded to y's dtype: there the delta must match to a relative
    error of 4 ulps of the dtype (measured: 7e-4 in fp16, 1e-2 in bf16, against 0.1% and 0.8% for one ulp)."""
    base = torch.tensor([s < 0 for s in rows])
    assert torch.equal(got[base], y0[base]), f"seed {seed}: base rows changed"
    dense = torch.tensor([lowrank and s >= 0 and rows.count(s) >= DENSE_MIN_ROWS for s in rows])
    if dense.any():
        delta_got, delta_want = (got.float() - y0.float())[dense], (want.float() - y0.float())[dense]
        rel = ((delta_got - delta_want).norm() / delta_want.norm()).item()
        assert rel <= 4 * ULP[got.dtype], f"seed {seed}: dense rows' delta off by {rel:.2e} (dtype {got.dtype})"
    err = (got.float() - want.float()).abs()[~dense]
    tol = ULP[got.dtype] * want.float().abs()[~dense] + 1e-3
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
    _assert_close(got, want, y0, rows, seed, lowrank=True)
    if any(s >= 0 for s in rows):
        assert not torch.equal(want, y0), f"seed {seed}: the delta did nothing"


def test_long_segments_split_off_for_the_dense_path() -> None:
    rows = ROW_CASES["long_segment_dense"]
    assert rows.count(3) >= DENSE_MIN_ROWS > max(rows.count(s) for s in (0, 1))
    meta = SlotMetadata.from_host(rows, S, torch.device("cpu"))
    rest, long = meta.split_long(DENSE_MIN_ROWS)
    assert [slot for slot, _ in long] == [3] and long[0][1].tolist() == [i for i, s in enumerate(rows) if s == 3]
    chunk = SlotMetadata.from_host([0, 1] + [2] * DENSE_MIN_ROWS + [1], S, torch.device("cpu"))
    assert chunk.split_long(DENSE_MIN_ROWS)[1] == [(2, slice(2, 2 + DENSE_MIN_ROWS))]   # consecutive: a view
    assert rest.row_slots.tolist() == [-1 if s == 3 else s for s in rows] and rest.num_rows == len(rows)
    assert meta.split_long(DENSE_MIN_ROWS)[0] is rest                  # once per step, not per linear
    assert meta.split_long(len(rows) + 1) == (meta, [])
    only_long = SlotMetadata.from_host([2] * DENSE_MIN_ROWS + [-1], S, torch.device("cpu"))
    assert only_long.split_long(DENSE_MIN_ROWS)[0] is None
    static = SlotMetadata.from_host(rows, S, torch.device("cpu"), pad_to=len(rows))
    assert static.split_long(DENSE_MIN_ROWS) == (static, [])        # a graph's launches are fixed


@pytest.mark.parametrize("dtype", (torch.float32, *DTYPES), ids=str)
@pytest.mark.parametrize("strategy", UNPACK_NAMES)
def test_dequantized_factors_match_reference(dtype: torch.dtype, strategy: str, gen, monkeypatch) -> None:
    """Every element the dense path reads: V whole, U's columns of each projection; rows past a slot's rank 0."""
    g, seed = gen
    monkeypatch.setitem(lowrank_dense.DEQUANT_CONFIG, "UNPACK", UNPACK_NAMES.index(strategy))
    projections = _projections(g)
    plan = lowrank_plan_for(projections)
    for slot in range(S):
        v, u = dequantized_factors(plan, slot, D_IN, G, dtype)
        want_v, want_u = dequantized_factors_reference(projections, slot, D_IN, G, dtype)
        assert v.dtype == u.dtype == dtype
        rtol = 1e-6 if dtype == torch.float32 else ULP[dtype]   # products in another order: one rounding apart
        torch.testing.assert_close(v, want_v, rtol=rtol, atol=0, msg=f"seed {seed} slot {slot}")
        torch.testing.assert_close(u, want_u, rtol=rtol, atol=0, msg=f"seed {seed} slot {slot}")
        assert v.abs().sum() > 0 and (v[want_v == 0] == 0).all()    # ranks past the slot's, padding: exact zeros
        assert v.shape[0] % 64 == 0 and all(start % 64 == 0 for start, _ in plan.dense_spans)   # cuBLAS alignment


# Tiles of both kernel kinds (mixed_with_base), and tl.dot tiles only: the unpacking strategy is the tl.dot
# kernels' inner loop alone, so the other strategies run where the decode kernels have no tile.
# The dtype only changes x's loads and y's stores, not the dequantization, so each width runs in one dtype: fp16
# takes widths 1, 4, 5, 8 and bf16 2, 3, 6, 7 (each dtype odd and even widths, half the interpreter time).
BIT_WIDTH_CASES = ([(bits, DTYPES[bits // 2 % 2], UNPACK_NAMES[0], "mixed_with_base") for bits in range(1, 9)]
                   + [(bits, torch.float16, u, "dot_tiles_only") for bits in range(1, 9) for u in UNPACK_NAMES[1:]])
DOT_TILES_ONLY = [2, -1, 0, 0, 2, 0, 2, 0, 2, 0, 2]  # two slots of five rows: no tile any decode kernel takes


@pytest.mark.parametrize("bits,dtype,strategy,case", BIT_WIDTH_CASES, ids=str)
def test_lowrank_kernel_every_bit_width(bits: int, dtype: torch.dtype, strategy: str, case: str, gen) -> None:
    g, seed = gen
    rows = ROW_CASES.get(case, DOT_TILES_ONLY)
    projections = _projections(g, bits=[bits] * S)
    x, y0, meta = _batch(rows, dtype, g)
    want, got = y0.clone(), y0.clone()
    add_lowrank_delta_reference(want, x, meta, projections, G)
    with forced_unpack(strategy):
        add_lowrank_delta_triton(got, x, meta, projections, G)
    _assert_close(got, want, y0, rows, seed, lowrank=True)


def _unpacked_fixed_point(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of quantize_rows' words, read back through the layout its module docstring gives: int64 [3, B, d]
    (top signed, middle, low), d a multiple of 32, and the byte sums after them, int64 [3, B, d / 32]."""
    n_blocks = words.shape[1] // 27
    blocks = words[:, :24 * n_blocks].contiguous().view(torch.int8).view(words.shape[0], -1, 96).long()
    k = torch.arange(32 * n_blocks)
    byte = [blocks[:, k // 32, 32 * i + (k % 8) * 4 + (k % 32) // 8] for i in range(3)]
    sums = words[:, 24 * n_blocks:].long().view(words.shape[0], n_blocks, 3).permute(2, 0, 1)
    return torch.stack([byte[0], byte[1] & 0xFF, byte[2] & 0xFF]), sums


@pytest.mark.parametrize("dtype", (torch.float32, *DTYPES), ids=str)
def test_activation_fixed_point_matches_reference(dtype: torch.dtype, gen) -> None:
    """quantize_rows (Triton) writes the reference's 24-bit q in its byte layout with the same scales, zeros past
    d, a zero group as 0, and each block's byte sums after the blocks; it zeroes the outputs it is given, and only
    those; q * scale is x to within half a step (plus fp32 rounding)."""
    g, seed = gen
    x = (torch.randn(5, D_IN, generator=g) * torch.rand(5, 1, generator=g) * 30).to(dtype)
    x[1, G:2 * G] = 0
    outputs = torch.full((5, 12), float("nan"))
    got = quantize_rows(x, G, outputs[:, 2:11])  # rows strided, as the shrink's view of its buffer
    q, scales = quantize_rows_reference(x, G)
    assert torch.equal(got.scales, scales), f"seed {seed}"
    byte, sums = _unpacked_fixed_point(got.words)
    full = byte[0] * 65536 + byte[1] * 256 + byte[2]
    assert torch.equal(full[:, :D_IN], q.long()), f"seed {seed}"
    assert not full[:, D_IN:].any() and not q[1, G:2 * G].any() and scales[1, 1] == 0, f"seed {seed}"
    assert torch.equal(sums, byte.view(3, 5, -1, 32).sum(dim=3)), f"seed {seed}"
    assert not outputs[:, 2:11].any() and outputs[:, [0, 1, 11]].isnan().all()  # zeroed: that view, nothing else
    with pytest.raises(ValueError, match="contiguous columns"):
        quantize_rows(x, G, outputs[:, ::2])
    step = scales.repeat_interleave(G, dim=1)[:, :D_IN]
    err = (q.double() * step.double() - x.double()).abs()
    assert (err <= 0.5 * step.double() + 1e-6 * x.double().abs()).all(), f"seed {seed}: {(err / step).max()}"


def test_shrink_intermediate_is_fp32_and_matches(gen, unpack) -> None:
    """z (rank-r intermediate) stays fp32: compare it where the kernel writes it (rows with a slot, ranks in use)."""
    g, seed = gen
    rows = ROW_CASES["mixed_with_base"]
    projections = _projections(g)
    x, _, meta = _batch(rows, torch.float16, g)
    got = shrink_triton(x, meta, lowrank_plan_for(projections), G)
    want = shrink_reference(x, meta, projections, G)
    assert got.dtype == torch.float32
    written = want != 0  # the reference writes zeros nowhere it computes: random inputs never give exactly 0
    torch.testing.assert_close(got[written], want[written], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


# Every row case with the default strategy; the others on the mixed case (the strategy only changes the tile's
# inner loop, which test_lowrank_kernel_every_bit_width covers for the low-rank kernels).
SIGN_CASES = [(c, UNPACK_NAMES[0]) for c in ROW_CASES] + [("mixed_with_base", u) for u in UNPACK_NAMES[1:]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,strategy", SIGN_CASES)
def test_sign_kernel_matches_reference(case: str, strategy: str, dtype: torch.dtype, gen) -> None:
    g, seed = gen
    rows = ROW_CASES[case]
    projections = [random_signs(S, D_IN, D_OUTS[0], 0, g), random_signs(S, D_IN, D_OUTS[1], D_OUTS[0], g)]
    x, y0, meta = _batch(rows, dtype, g)
    want, got = y0.clone(), y0.clone()
    add_sign_delta_reference(want, x, meta, projections)
    with forced_unpack(strategy):
        add_sign_delta_triton(got, x, meta, projections)
    _assert_close(got, want, y0, rows, seed)


@pytest.mark.parametrize("decode_rows, share_rows", [(2, 0), (2, 1), (4, 1)])
def test_decode_kernels_on_forced_tile_heights(decode_rows: int, share_rows: int, gen) -> None:
    """With DECODE_ROWS forced (bench/decode_rows_sweep.py times it so), the decode kernels take tiles of up to
    that many rows, their rows sharing each bit test in the expand and sign kernels, and in the shrink with
    SHARE_ROWS (else one pass a row): all match the references. Segments of 1 to decode_rows rows, so a tile may
    be partly masked."""
    from deltaserve.kernels.tuning import forced_decode_config, forced_decode_rows
    g, seed = gen
    rows = [0, 1, 1, 2, -1, 2, 2, 3, 3, 3, 3] if decode_rows == 4 else [0, 1, 1, -1, 3, 3]
    x, y0, _ = _batch(rows, torch.float16, g)
    lowrank = _projections(g)
    signs = [random_signs(S, D_IN, D_OUTS[0], 0, g), random_signs(S, D_IN, D_OUTS[1], D_OUTS[0], g)]
    with forced_decode_rows(decode_rows), forced_decode_config("shrink", SHARE_ROWS=share_rows):
        meta = SlotMetadata.build(torch.tensor(rows, dtype=torch.int32), S)
        assert {tuple(meta.tile_kinds(k)) for k in KERNELS} == {(True, False, decode_rows)}
        for add, ref, args in ((add_lowrank_delta_triton, add_lowrank_delta_reference, (lowrank, G)),
                               (add_sign_delta_triton, add_sign_delta_reference, (signs,))):
            want, got = y0.clone(), y0.clone()
            ref(want, x, meta, *args)
            add(got, x, meta, *args)
            _assert_close(got, want, y0, rows, seed)


def test_forced_decode_configs_match_reference(gen) -> None:
    """bench/tune_decode.py times the decode kernels' splits and program sizes through forced_decode_config: any
    candidate shape it forces (more splits than k tiles or ranks, halved programs) still matches the reference,
    and the forcing ends with the block."""
    from deltaserve.kernels.tuning import decode_config, forced_decode_config
    g, seed = gen
    rows = [0, 1, -1, 3, 2]
    x, y0, meta = _batch(rows, torch.float16, g)
    lowrank = _projections(g)
    want = y0.clone()
    add_lowrank_delta_reference(want, x, meta, lowrank, G)
    before = decode_config("expand", 4, G)
    with forced_decode_config("shrink", SPLIT_K=8, BLOCK_R=32, num_warps=1), \
            forced_decode_config("expand", SPLIT_R=16, BLOCK_N=32, num_warps=1):
        assert decode_config("expand", 4, G)["SPLIT_R"] == 16 and decode_config("shrink", 4, G)["BLOCK_R"] == 32
        got = y0.clone()
        add_lowrank_delta_triton(got, x, meta, lowrank, G)
    _assert_close(got, want, y0, rows, seed)
    assert decode_config("expand", 4, G) == before
    with pytest.raises(ValueError, match="unknown kernel"):
        with forced_decode_config("gemm", SPLIT_K=2):
            pass


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
    terms = [(dequantize(up, us, d_out, G).double(), s.double(), dequantize(vp, vs, D_IN, G).double())
             for _, _, vp, vs, up, us, s in factors]
    dense = sum(u.T @ torch.diag(s) @ v for u, s, v in terms)
    dense_abs = sum(u.abs().T @ torch.diag(s.abs()) @ v.abs() for u, s, v in terms)
    x = torch.randn(3, D_IN, generator=g)
    y0 = torch.randn(3, d_out, generator=g)
    y = y0.clone()
    meta = SlotMetadata.build(torch.tensor([0, 1, 0]), 2)
    add_lowrank_delta(y, x, meta, [LowRankProjection(0, d_out, slot_tiers)], G)
    rows = [0, 2]
    exact = y0[rows].double() + x[rows].double() @ dense.T
    # fp32 forward-error bound of the reference's sums (d_in products, then the ranks, then y): n * eps * the sum of
    # the terms' magnitudes. A fixed atol failed on rare seeds where large terms cancel (seed 437031571: 1.24e-5).
    n_adds = D_IN + sum(r for r, _ in tiers) + 1
    bound = n_adds * torch.finfo(torch.float32).eps * (y0[rows].double().abs() + x[rows].double().abs() @ dense_abs.T)
    err = (y[rows].double() - exact).abs()
    assert (err <= bound).all(), f"seed {seed}: error {(err - bound).max().item():.3g} over the fp32 bound"
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


def test_expand_workspace_view_specializes_as_a_fresh_one(gen, monkeypatch) -> None:
    """add_lowrank_delta_triton's expand workspace is a view of the buffer it shares with z: 16-byte aligned, with
    a row stride that divides by 16 as y's width does, like the fresh workspace the start-up warm-up compiles with
    (Triton specializes on both), whatever the plan's z width; and the delta stays the reference's."""
    g, seed = gen
    rows = ROW_CASES["mixed_with_base"]
    projections = _projections(g)
    plan = lowrank_plan_for(projections)
    assert plan.z_width % 16, "the test needs a z width off the 16 grid"
    x, y0, meta = _batch(rows, torch.float16, g)
    seen = []

    def spy(y, z, meta, plan, group_size, config=None, ws=None):
        seen.append(ws)
        return expand_triton(y, z, meta, plan, group_size, config, ws)

    monkeypatch.setattr(lowrank_delta, "expand_triton", spy)
    want, got = y0.clone(), y0.clone()
    add_lowrank_delta_reference(want, x, meta, projections, G)
    add_lowrank_delta_triton(got, x, meta, projections, G, plan)
    (ws,) = seen
    assert ws.data_ptr() % 16 == 0 and ws.stride(0) % 16 == got.shape[1] % 16 and ws.shape == got.shape
    _assert_close(got, want, y0, rows, seed, lowrank=True)


def test_uploaded_views_start_16_byte_aligned(gen) -> None:
    """Triton specializes kernels on the 16-byte alignment of each pointer: metadata views at offsets that follow
    the batch's list lengths would compile a new variant per batch layout inside requests."""
    from deltaserve.kernels.tables import upload_lists
    g, seed = gen
    lengths = torch.randint(0, 9, (6,), generator=g).tolist()
    parts = [torch.randint(-50, 50, (n,), generator=g).tolist() for n in lengths]
    for dtype in (torch.int32, torch.int64, torch.float32):
        views = upload_lists(parts, torch.device("cpu"), dtype)
        assert [v.tolist() for v in views] == [[float(x) if dtype.is_floating_point else x for x in p] for p in parts]
        assert all(v.data_ptr() % 16 == 0 for v in views), f"seed {seed}: {lengths}"
    meta = SlotMetadata.build(torch.tensor(torch.randint(-1, 3, (7,), generator=g).tolist()), 3)
    tiles = meta.launch_tiles() or (0, meta.sorted_rows, meta.sorted_rows)
    fields = (meta.row_slots, meta.sorted_rows, meta.seg_slots, meta.seg_starts, meta.seg_lens, *tiles[1:])
    assert all(t.data_ptr() % 16 == 0 for t in fields), f"seed {seed}"


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


# Static (CUDA-graph) metadata: rows padded with base rows to a fixed count, launches sized by that count alone.
STATIC_CASES = {k: ROW_CASES[k] for k in ("batch_of_one", "all_base", "every_row_own_slot", "mixed_with_base")}
PAD = 3  # rows past the batch


def _launch(kind: str, y: torch.Tensor, x: torch.Tensor, meta: SlotMetadata, projections: list, plan=None) -> None:
    if kind == "lowrank":
        add_lowrank_delta_triton(y, x, meta, projections, G, plan)
    else:
        add_sign_delta_triton(y, x, meta, projections, plan)


def _kind_projections(kind: str, g: torch.Generator) -> list:
    if kind == "lowrank":
        return _projections(g)
    return [random_signs(S, D_IN, D_OUTS[0], 0, g), random_signs(S, D_IN, D_OUTS[1], D_OUTS[0], g)]


# Padding is about rows, not the dtype: the cases take turns at the two dtypes (half the interpreter time).
@pytest.mark.parametrize("kind", ["lowrank", "sign"])
@pytest.mark.parametrize("case,dtype", [(case, DTYPES[i % 2]) for i, case in enumerate(STATIC_CASES)], ids=str)
def test_static_metadata_matches_unpadded(case: str, kind: str, dtype: torch.dtype, gen) -> None:
    """Padded to B + PAD rows: the batch's rows get exactly what the unpadded launch gives, padding rows nothing."""
    g, seed = gen
    rows = STATIC_CASES[case]
    B, P = len(rows), len(rows) + PAD
    projections = _kind_projections(kind, g)
    x, y0, _ = _batch(rows + [-1] * PAD, dtype, g)  # random padding rows too: they must stay as they are
    meta = SlotMetadata.from_host(rows, S, torch.device("cpu"))
    static = SlotMetadata.from_host(rows, S, torch.device("cpu"), pad_to=P)
    assert static.static and static.num_rows == P and static.row_slots.tolist() == rows + [-1] * PAD
    got, want = y0.clone(), y0[:B].clone()
    _launch(kind, want, x[:B], meta, projections)
    _launch(kind, got, x, static, projections)
    assert torch.equal(got[:B], want), f"seed {seed}: padded launch differs from the unpadded one"
    assert torch.equal(got[B:], y0[B:]), f"seed {seed}: padding rows changed"


def test_static_metadata_shapes_depend_on_padding_only() -> None:
    P = 40
    shapes = {tuple(tuple(t.shape) for t in (m.row_slots, m.sorted_rows, m.seg_slots, m.seg_starts, m.seg_lens,
                                              *m.launch_tiles()[1:])) + (m.launch_tiles()[0],)
              for rows in ([], [1], [-1] * 40, list(range(S)) * 10, [0] * 33 + [3] * 7)
              for m in [SlotMetadata.from_host(rows, S, torch.device("cpu"), pad_to=P)]}
    assert len(shapes) == 1
    # The tile bound is tight: S one-row segments plus one long segment.
    rows = [0] * (P - S + 1) + list(range(1, S))
    assert len(SlotMetadata.from_host(rows, S, torch.device("cpu")).blocks(16)[0]) == static_tile_count(P, S)


@pytest.mark.parametrize("kind", ["lowrank", "sign"])
def test_fitted_static_metadata_launches_as_the_unpadded_step(kind: str, gen) -> None:
    """fit_tiles (an exact decode graph's metadata): the step's own tile height and its tile count padded to a
    power of two, so a launch equals the unpadded one bit for bit (same tiles, same configs); copy_ takes a step
    of the same tiles, and refuses other tiles and launch_every_variant."""
    g, seed = gen
    cpu = torch.device("cpu")
    rows, P = [0] * 20 + [-1, 2, 2, 3], 28        # a 20-row segment: 32-row tiles, three of them, padded to four
    static = SlotMetadata.from_host(rows, S, cpu, pad_to=P, fit_tiles=True)
    assert static.tile_shape == (32, 4) and static.launch_tiles()[0] == 32
    assert SlotMetadata.from_host(rows, S, cpu, pad_to=P).tile_shape == (16, static_tile_count(P, S))
    projections = _kind_projections(kind, g)
    plan = lowrank_plan_for(projections) if kind == "lowrank" else sign_plan_for(projections)
    x, y0, _ = _batch(rows + [-1] * (P - len(rows)), torch.float16, g)
    got, want = y0.clone(), y0[:len(rows)].clone()
    _launch(kind, want, x[:len(rows)], SlotMetadata.from_host(rows, S, cpu), projections, plan)
    _launch(kind, got, x, static, projections, plan)
    assert torch.equal(got[:len(rows)], want) and torch.equal(got[len(rows):], y0[len(rows):]), f"seed {seed}"
    same_tiles = [3] * 17 + [1, -1, 0, 0]         # other slots and heights, the same (32, 4) tiles and launches
    fresh = SlotMetadata.from_host(same_tiles, S, cpu, pad_to=P, fit_tiles=True)
    assert fresh.graph_key() == static.graph_key()
    static.copy_(fresh)
    got, want = y0.clone(), y0.clone()
    _launch(kind, got, x, static, projections, plan)
    _launch(kind, want, x, fresh, projections, plan)
    assert torch.equal(got, want), f"seed {seed}"
    with pytest.raises(ValueError, match=r"other's tiles are \(16, 4\) \(rows, count\), self's \(32, 4\)"):
        static.copy_(SlotMetadata.from_host([0, 1, 2, 3], S, cpu, pad_to=P, fit_tiles=True))
    with pytest.raises(ValueError, match="launch_every_variant needs static metadata for any mix"):
        static.launch_every_variant()


@pytest.mark.parametrize("kind", ["lowrank", "sign"])
def test_static_copy_then_launch_equals_fresh_launch(kind: str, gen) -> None:
    """copy_ into metadata that already served a launch (as a captured graph's does), then launch again."""
    g, seed = gen
    first, second = [-1, 2, 2, 0, -1], [3, 1, 3, -1, 0, 1, 2]
    P = 8
    projections = _kind_projections(kind, g)
    plan = lowrank_plan_for(projections) if kind == "lowrank" else sign_plan_for(projections)
    x, y0, _ = _batch(second + [-1] * (P - len(second)), torch.float16, g)
    held = SlotMetadata.from_host(first, S, torch.device("cpu"), pad_to=P)
    _launch(kind, y0.clone(), x, held, projections, plan)
    fresh = SlotMetadata.from_host(second, S, torch.device("cpu"), pad_to=P)
    held.copy_(fresh)
    got, want = y0.clone(), y0.clone()
    _launch(kind, got, x, held, projections, plan)
    _launch(kind, want, x, fresh, projections, plan)
    assert torch.equal(got, want), f"seed {seed}"
    reference = y0.clone()
    (add_lowrank_delta_reference(reference, x, held, projections, G) if kind == "lowrank" else
     add_sign_delta_reference(reference, x, held, projections))
    _assert_close(got, reference, y0, second + [-1] * (P - len(second)), seed)


@pytest.mark.parametrize("kind", ["lowrank", "sign"])
def test_covering_metadata_replays_every_row_mix(kind: str, gen) -> None:
    """Static metadata launching every variant (a covering decode graph's): after copy_ of mixes whose kernels
    differ (one-row tiles only, two- and three-row tiles, a full 16-row tile next to one-row ones, all base), each
    launch equals the reference of that mix."""
    g, seed = gen
    P = 20
    projections = _kind_projections(kind, g)
    plan = lowrank_plan_for(projections) if kind == "lowrank" else sign_plan_for(projections)
    held = SlotMetadata.from_host([0], S, torch.device("cpu"), pad_to=P)
    held.launch_every_variant()
    assert all(k.decode and k.dot for k in held.launch_kinds())
    mixes = [[3, 0, 2, 1], [2, 2, -1, 0, 0, 0, 1], [1] * 16 + [0, 3, -1, 2], [-1] * 5]
    kinds = {SlotMetadata.from_host(rows, S, torch.device("cpu"), pad_to=P).launch_kinds() for rows in mixes}
    assert len(kinds) >= 3, "the mixes must need different launches"
    for rows in mixes:
        padded = rows + [-1] * (P - len(rows))
        x, y0, _ = _batch(padded, torch.float16, g)
        held.copy_(SlotMetadata.from_host(rows, S, torch.device("cpu"), pad_to=P))
        got, want = y0.clone(), y0.clone()
        _launch(kind, got, x, held, projections, plan)
        (add_lowrank_delta_reference(want, x, held, projections, G) if kind == "lowrank" else
         add_sign_delta_reference(want, x, held, projections))
        _assert_close(got, want, y0, padded, seed)


def test_static_copy_rejects_other_padding() -> None:
    cpu = torch.device("cpu")
    held = SlotMetadata.from_host([0, 1], S, cpu, pad_to=4)
    with pytest.raises(ValueError, match="padded to 5 rows"):
        held.copy_(SlotMetadata.from_host([0, 1], S, cpu, pad_to=5))
    with pytest.raises(ValueError, match="static metadata on both sides"):
        held.copy_(SlotMetadata.from_host([0, 1, -1, -1], S, cpu))
    # Rows needing a tl.dot kernel (a 5-row slot) cannot replay a graph captured with decode tiles only.
    with pytest.raises(ValueError, match=r"need \(TileKinds\(decode=False, dot=True.*self's launch \(TileKinds\(decode=True, dot=False"):
        SlotMetadata.from_host([0, 1], S, cpu, pad_to=8).copy_(SlotMetadata.from_host([2] * 5, S, cpu, pad_to=8))
    with pytest.raises(ValueError, match="pad_to must be >= 1 and >= the 2 rows"):
        SlotMetadata.from_host([0, 1], S, cpu, pad_to=1)
    with pytest.raises(ValueError, match="launch_every_variant needs static metadata"):
        SlotMetadata.from_host([0, 1], S, cpu).launch_every_variant()


def test_multi_row_tiles_follow_each_kernels_decode_policy(monkeypatch) -> None:
    """As on a GPU: one-row tiles take every decode kernel; tiles of 2..max_rows rows take a kernel's decode variant
    from its policy's tile count (at the next power of two rows), its tl.dot variant below that; taller tiles always
    take tl.dot (tuning.DECODE_ROWS_POLICY says why each kernel's policy is what it is)."""
    from deltaserve.kernels import tuning
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)

    def kinds(rows: list[int], kernel: str) -> tuple:
        return tuple(SlotMetadata.from_host(rows, 256, torch.device("cpu")).tile_kinds(kernel))

    def tiles(n: int, rows: int) -> list[int]:
        return [s for s in range(n) for _ in range(rows)]
    for kernel in KERNELS:
        policy = tuning.DECODE_ROWS_POLICY[kernel]
        top, many = policy.max_rows, max(policy.from_tiles, 2)
        assert kinds(tiles(many, 2), kernel) == (True, False, 2)
        assert kinds(tiles(many, top), kernel) == (True, False, top)
        assert kinds(tiles(many, top + 1), kernel) == (False, True, 1)
        assert kinds(tiles(many - 1, 1) + [200] * top, kernel) == (True, False, top)  # one tall tile among many
        assert kinds(tiles(many - 1, 1) + [200] * (top + 1), kernel) == (True, True, 1)  # too tall: tl.dot
        assert kinds(tiles(2 * many, 1), kernel) == (True, False, 1)  # many tiles, none of two rows
        assert kinds([-1, 0, -1], kernel) == (True, False, 1)
        assert kinds([-1, -1], kernel) == (False, False, 1)
        if policy.from_tiles > 1:
            assert kinds(tiles(policy.from_tiles - 1, 2), kernel) == (False, True, 1)
            assert kinds(tiles(policy.from_tiles - 2, 1) + [200] * 2, kernel) == (True, True, 1)  # one tile short
    # The policies as measured: four-row tiles on every decode kernel, five rows and up on tl.dot; forcing one height
    # overrides them.
    assert all(kinds(tiles(64, 4), k) == (True, False, 4) for k in KERNELS)
    assert all(kinds(tiles(64, 5), k) == (False, True, 1) for k in KERNELS)
    with tuning.forced_decode_rows(2):
        assert kinds(tiles(3, 3), "shrink") == (False, True, 2)
    assert kinds(tiles(3, 3), "shrink") == (True, False, 4)
    with pytest.raises(ValueError, match="must be 1, 2 or 4"):
        with tuning.forced_decode_rows(3):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_path_on_cuda(dtype: torch.dtype, gen) -> None:
    """The dense path's GEMMs on CUDA (half-precision operands, fp32 results) against the reference: the delta of
    the rows with a slot to 4 ulps of the dtype (on the GPU the tl.dot kernels' tf32 expand misses _assert_close's
    one-ulp bound as well), base rows untouched."""
    _, seed = gen
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = ROW_CASES["long_segment_dense"]
    projections = _projections(g, group_size=128)
    x = torch.randn(len(rows), D_IN, device="cuda", generator=g).to(dtype)
    y0 = (torch.randn(len(rows), sum(D_OUTS), device="cuda", generator=g) * 4).to(dtype)
    meta = SlotMetadata.from_host(rows, S, torch.device("cuda"))
    want, got = y0.clone(), y0.clone()
    add_lowrank_delta_reference(want, x, meta, projections, 128)
    add_lowrank_delta(got, x, meta, projections, 128)
    base = torch.tensor([s < 0 for s in rows], device="cuda")
    assert torch.equal(got[base], y0[base]), f"seed {seed}: base rows changed"
    delta_got, delta_want = (got.float() - y0.float())[~base], (want.float() - y0.float())[~base]
    rel = ((delta_got - delta_want).norm() / delta_want.norm()).item()
    assert rel <= 4 * ULP[dtype], f"seed {seed}: delta off by {rel:.2e} (dtype {dtype})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("covering", [False, True], ids=["own_kinds", "covering"])
def test_cuda_graph_replays_after_copy(gen, covering: bool) -> None:
    """Capture add_lowrank_delta and add_sign_delta with static metadata after a warm-up call; replay after
    copy_ of another row mix (and new x, y): equal to the reference of that mix. covering: the metadata launches
    every variant (a covering decode graph's), and the replayed mix needs other kinds than the captured one."""
    _, seed = gen
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, P, gs = torch.device("cuda"), 16, 128  # the GPU configs' tiles need groups of 128
    lowrank, signs = _projections(g, group_size=gs), _kind_projections("sign", g)
    lowrank_plan, signs_plan = lowrank_plan_for(lowrank), sign_plan_for(signs)
    x = torch.randn(P, D_IN, device=dev, dtype=torch.float16, generator=g)
    y = torch.randn(P, sum(D_OUTS), device=dev, dtype=torch.float16, generator=g)
    meta = SlotMetadata.from_host([0, 0, 1, 1, 1, 1, 1, 2, 3], S, dev, pad_to=P)  # both variants of each kernel
    if covering:
        meta.launch_every_variant()

    def step() -> None:
        add_lowrank_delta(y, x, meta, lowrank, gs, plan=lowrank_plan)
        add_sign_delta(y, x, meta, signs, plan=signs_plan)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    rows = [3, -1, 2, 0, 1, 1, 1, 1, 1, -1, 2, 0, 1]  # the same kinds (SlotMetadata.launch_kinds)
    if covering:  # a three-row tile, one-row tiles, and no tile over four rows: other kinds
        rows = [3, -1, 2, 0, 2, -1, 2, 1]
        assert SlotMetadata.from_host(rows, S, dev, pad_to=P).launch_kinds() != SlotMetadata.from_host(
            [0, 0, 1, 1, 1, 1, 1, 2, 3], S, dev, pad_to=P).launch_kinds()
    meta.copy_(SlotMetadata.from_host(rows, S, dev, pad_to=P))
    x.copy_(torch.randn(P, D_IN, device=dev, dtype=torch.float16, generator=g))
    y0 = torch.randn(P, sum(D_OUTS), device=dev, dtype=torch.float16, generator=g)
    y.copy_(y0)
    graph.replay()
    want = y0.clone()
    add_lowrank_delta_reference(want, x, meta, lowrank, gs)
    add_sign_delta_reference(want, x, meta, signs)
    base = torch.tensor([s < 0 for s in rows + [-1] * (P - len(rows))], device=dev)
    assert torch.equal(y[base], y0[base]), f"seed {seed}: base or padding rows changed"
    # The GPU multiplies in tf32 in expand (11 significant bits), not exactly as the interpreter does.
    got_delta, want_delta = (y[~base].double() - y0[~base].double()), (want[~base].double() - y0[~base].double())
    rel = ((got_delta - want_delta).norm() / want_delta.norm()).item()
    assert rel < 3e-3, f"seed {seed}: relative error of the delta {rel}"


def _gpu_defaults(monkeypatch) -> None:
    """launch_config as on a GPU without a config table (the interpreter's defaults are small tiles)."""
    from deltaserve.kernels import tuning
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_forced", [None])
    monkeypatch.setattr(tuning, "config_table", dict)
    tuning._launch_config.cache_clear()


@pytest.mark.parametrize("group_size, tile", [(32, 32), (96, 32), (64, 64), (128, 128), (256, 128)])
def test_launch_config_fits_tiles_to_any_group_size(monkeypatch, group_size, tile):
    """The GPU tiles are 128 elements along the quantized axis; a delta file with a group size they do not divide
    must still run, with the tile cut to fit one scale group."""
    from deltaserve.kernels.tuning import launch_config
    _gpu_defaults(monkeypatch)
    assert launch_config("shrink", (4096, 907), group_size, 1, 16).tiles[1] == tile
    assert launch_config("expand", (4096,), group_size, 1, 16).tiles[1] == tile
    assert launch_config("sign", (4096, 4096), None, 1, 16).tiles[1] == 128


def test_launch_config_splits_more_when_few_row_tiles(monkeypatch):
    """One slot's rows make one program per rank block: the reduction axis is split to fill the GPU."""
    from deltaserve.kernels.tuning import launch_config, work_bucket
    _gpu_defaults(monkeypatch)
    for kernel, shape, gs in (("shrink", (4096, 907), 128), ("expand", (4096,), 128), ("sign", (4096, 4096), None)):
        splits = [launch_config(kernel, shape, gs, work_bucket(n), 16).tiles[2] for n in (1, 4, 16, 64)]
        assert splits == sorted(splits, reverse=True) and splits[0] > splits[-1], (kernel, splits)


def test_launch_config_never_runs_pairs_expand_at_64_row_tiles(monkeypatch):
    """triton 3.6 on the H100 cannot compile the pairs expand kernel at BLOCK_M 64: a forced "pairs" runs planes
    there, and pairs at smaller row tiles."""
    from deltaserve.kernels.tuning import launch_config
    _gpu_defaults(monkeypatch)
    pairs, planes = UNPACK_NAMES.index("pairs"), UNPACK_NAMES.index("planes")
    with forced_unpack("pairs"):
        assert launch_config("expand", (4096,), 128, 1, 16).unpack == pairs
        assert launch_config("expand", (4096,), 128, 1, 64).unpack == planes
        assert launch_config("shrink", (4096, 907), 128, 1, 64).unpack == pairs


def test_launch_config_reads_the_tuned_table(monkeypatch, tmp_path):
    """A table written by write_config_table (bench/tune_kernels.py) is what launch_config returns for its keys;
    other keys get the defaults; a malformed table is refused by name."""
    from deltaserve.kernels import tuning
    from deltaserve.kernels.tuning import LaunchConfig, default_config, launch_config, table_key, write_config_table
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_forced", [None])
    tuned = LaunchConfig((16, 64, 8), UNPACK_NAMES.index("pairs"), 8, 4)
    path = tmp_path / "gpu.json"
    write_config_table(path, {table_key("shrink", (4096, 907), 128, 16, 16): tuned}, {"device": "test"})
    monkeypatch.setenv("DELTASERVE_KERNEL_CONFIGS", str(path))
    tuning._launch_config.cache_clear()
    assert launch_config("shrink", (4096, 907), 128, 16, 16) == tuned
    assert launch_config("shrink", (4096, 907), 128, 32, 16) == default_config("shrink", 32)
    bad = tmp_path / "bad.json"
    bad.write_text('{"configs": {"expand d=4096 g=128 w=1 m=16": {"BLOCK_R": 32}}}')
    monkeypatch.setenv("DELTASERVE_KERNEL_CONFIGS", str(bad))
    tuning._launch_config.cache_clear()
    with pytest.raises(ValueError, match="bad.json.*exactly the fields"):
        launch_config("expand", (4096,), 128, 1, 16)
    tuning._launch_config.cache_clear()


def test_decode_table_entries_reach_the_kernels(monkeypatch, tmp_path, gen):
    """A GPU table's decode_configs (bench/tune_decode.py) set the decode kernels' meta-parameters for their keys,
    over the built-in defaults and under forced_decode_config; the launch configs' section and the decode section
    are written by different scripts and each keeps the other's; a kernel run on an entry matches the reference; a
    malformed entry is refused by name."""
    from deltaserve.kernels import tuning
    from deltaserve.kernels.tuning import (LaunchConfig, decode_config, decode_table_key, forced_decode_config,
                                           launch_config, table_key, write_config_table, write_decode_table)
    g, seed = gen
    rows = [0, 1, -1, 3, 2]  # four one-row tiles: work bucket 4
    x, y0, meta = _batch(rows, torch.float16, g)
    lowrank = _projections(g)
    path = tmp_path / "gpu.json"
    entry = {"SPLIT_K": 4, "BLOCK_R": 32}
    sign_entry = {"SPLIT_K": 3, "BLOCK_N": 32}  # keyed by the tuner's group size: sign has none, so g=0
    entries = {decode_table_key("shrink", G, 4, 1): entry, decode_table_key("sign", G, 4, 1): sign_entry}
    write_decode_table(path, entries, {"device": "test"})
    tuning._launch_config.cache_clear()
    untuned = launch_config("shrink", (D_IN, 20), G, 4, 16)  # no table
    monkeypatch.setenv("DELTASERVE_KERNEL_CONFIGS", str(path))
    tuning._launch_config.cache_clear()
    assert launch_config("shrink", (D_IN, 20), G, 4, 16) == untuned  # a table of decode entries only
    tuned = LaunchConfig((16, 32, 1), num_stages=1)
    write_config_table(path, {table_key("shrink", (D_IN, 20), G, 4, 16): tuned}, {"device": "test"})
    tuning._read_table.cache_clear()  # read once per path: a server reads the table at its start
    tuning._decode_table_entry.cache_clear()
    tuning._launch_config.cache_clear()
    try:
        built_in = tuning._default_decode_config("shrink", 4, G)
        assert decode_config("shrink", 4, G) == {**built_in, **entry}
        assert decode_config("shrink", 8, G) == tuning._default_decode_config("shrink", 8, G)  # no entry
        assert decode_config("sign", 4, None) == {**tuning._default_decode_config("sign", 4, None), **sign_entry}
        assert launch_config("shrink", (D_IN, 20), G, 4, 16) == tuned  # the other script's section kept
        with forced_decode_config("shrink", SPLIT_K=2):
            assert decode_config("shrink", 4, G)["SPLIT_K"] == 2
        want, got = y0.clone(), y0.clone()
        add_lowrank_delta_reference(want, x, meta, lowrank, G)
        add_lowrank_delta_triton(got, x, meta, lowrank, G)
        _assert_close(got, want, y0, rows, seed)
        path.write_text('{"decode_configs": {"expand g=128 w=1 r=1": {"BLOCK_R": 32}}}')
        monkeypatch.setenv("DELTASERVE_KERNEL_CONFIGS", str(tmp_path / "bad.json"))
        (tmp_path / "bad.json").write_text(path.read_text())
        tuning._decode_table_entry.cache_clear()
        with pytest.raises(ValueError, match="bad.json.*expand g=128 w=1 r=1"):
            decode_config("expand", 1, 128)
        (tmp_path / "bad.json").write_text('{"decode_configs": {"sign g=128 w=1 r=1": {"BLOCK_N": 32}}}')
        tuning._read_decode_table.cache_clear()
        tuning._decode_table_entry.cache_clear()
        with pytest.raises(ValueError, match="sign g=128 w=1 r=1.*g=0"):  # an entry no launch would find
            decode_config("sign", 1, None)
    finally:
        for cached in (tuning._read_table, tuning._read_decode_table, tuning._decode_table_entry,
                       tuning._launch_config):
            cached.cache_clear()


def test_warmup_configs_cover_every_launch_config(monkeypatch, tmp_path):
    """What the engine compiles at start-up (engine/kernel_warmup.py) covers each compile launch_config can ask
    for, at any shape and work bucket, from a table with several configs at one tile height or from the defaults;
    configs that differ only in their (runtime) split are one compile."""
    from deltaserve.kernels import tuning
    from deltaserve.kernels.tuning import (WORK_BUCKETS, LaunchConfig, launch_config, table_key, warmup_configs,
                                           write_config_table)
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_forced", [None])
    pairs = UNPACK_NAMES.index("pairs")
    table = {table_key("shrink", (4096, 907), 128, 4, 16): LaunchConfig((16, 64, 8), pairs, 8, 4),
             table_key("shrink", (11008, 1348), 128, 16, 16): LaunchConfig((32, 128, 2), pairs),
             table_key("expand", (4096,), 128, 2, 64): LaunchConfig((32, 128, 4), pairs),   # pairs: cut to planes
             table_key("sign", (4096, 4096), None, 8, 32): LaunchConfig((64, 256, 4), num_warps=8)}
    path = tmp_path / "gpu.json"
    write_config_table(path, table, {"device": "test"})
    monkeypatch.setenv("DELTASERVE_KERNEL_CONFIGS", str(path))
    tuning._launch_config.cache_clear()
    shapes = {"shrink": [(4096, 907), (11008, 1348), (4096, 64)], "expand": [(4096,), (11008,)],
              "sign": [(4096, 4096), (11008, 4096)]}
    for kernel, kernel_shapes in shapes.items():
        gs = None if kernel == "sign" else 128
        for m in (16, 32, 64):
            warm = {c.compile_key() for c in warmup_configs(kernel, gs, m)}
            needed = {launch_config(kernel, shape, gs, w, m).compile_key() for shape in kernel_shapes
                      for w in WORK_BUCKETS}
            assert needed <= warm, (kernel, m, needed - warm)
            assert len(warm) == len(warmup_configs(kernel, gs, m))  # no compile twice
    assert len(warmup_configs("shrink", 128, 16)) == 3  # the default and the two tuned ones
    tuning._launch_config.cache_clear()


def test_decode_variants_cover_every_decode_launch(monkeypatch):
    """The decode kernels compile per (rows, split) pair: the start-up warm-up's steps (rows rows on each of n
    slots) reach every pair a step of any tile count and height can take, for each kernel, with the GPU's
    configs."""
    from deltaserve.kernels import tuning
    from deltaserve.kernels.tuning import decode_config, decode_variants, work_bucket
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)

    def variants(n_tiles: int, rows: int, gs: int) -> set[tuple]:
        slots = [s for s in range(n_tiles) for _ in range(rows)]
        meta = SlotMetadata.from_host(slots, n_tiles, torch.device("cpu"))
        return {(k, meta.tile_kinds(k).decode_rows,
                 tuple(decode_config(k, work_bucket(n_tiles), gs, meta.tile_kinds(k).decode_rows).items()))
                for k in KERNELS if meta.tile_kinds(k).decode}
    for gs in (32, 128):
        warm = set().union(*(variants(n, rows, gs) for n, rows in decode_variants(gs)))
        assert set().union(*(variants(n, rows, gs) for n in range(1, 100) for rows in range(1, 6))) == warm
        assert len(decode_variants(gs)) > 4


@pytest.mark.parametrize("kernel", ["shrink", "expand", "sign"])
def test_every_tuning_candidate_matches_the_reference(gen, kernel):
    """bench/tune_kernels.py may put any candidate in a GPU's table: each must compute the reference's numbers
    (their tiles cut to the test's group size, as launch_config cuts them)."""
    from deltaserve.kernels.lowrank_expand import expand_triton
    from deltaserve.kernels.tuning import LaunchConfig, candidates
    g, seed = gen
    rows = DOT_TILES_ONLY  # the candidates are tl.dot kernels' configs (the decode kernels' are fixed)
    x, y0, meta = _batch(rows, torch.float16, g)
    assert {meta.tile_kinds(k)[:2] for k in KERNELS} == {(False, True)}, "the rows must give tl.dot tiles only"
    want = y0.clone()
    if kernel == "sign":
        signs = _kind_projections("sign", g)
        add_sign_delta_reference(want, x, meta, signs)
    else:
        projections = _projections(g)
        plan = lowrank_plan_for(projections)
        add_lowrank_delta_reference(want, x, meta, projections, G)
        z = shrink_triton(x, meta, plan, G)
    cut_tiles = {(tuple(min(t, G) if i == 1 and kernel != "sign" else t for i, t in enumerate(c.tiles)), c.unpack)
                 for c in candidates(kernel)}  # warps and stages mean nothing to the interpreter
    for tiles, unpack in sorted(cut_tiles):
        cut = LaunchConfig(tiles, unpack)
        y = y0.clone()
        if kernel == "sign":
            add_sign_delta_triton(y, x, meta, signs, config=cut)
        elif kernel == "shrink":
            expand_triton(y, shrink_triton(x, meta, plan, G, config=cut), meta, plan, G)
        else:
            expand_triton(y, z, meta, plan, G, config=cut)
        _assert_close(y, want, y0, rows, f"{seed}, {kernel} {cut}")
