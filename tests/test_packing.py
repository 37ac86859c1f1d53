"""Property tests of the bit-plane layout shared by the compressor and the kernels (docs/CONTRACTS.md)."""

import pytest
import torch

from deltaserve.delta_store.packing import (
    dequantize,
    pack_bitplanes,
    quantize_groups,
    unpack_bitplanes,
)

SHAPES = [(1, 1), (3, 31), (4, 32), (5, 33), (2, 200), (7, 513)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(bits: int, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=gen).to(torch.uint8)
    planes = pack_bitplanes(codes, bits)
    assert planes.dtype == torch.int32
    assert tuple(planes.shape) == (bits, shape[0], -(-shape[1] // 32))
    assert torch.equal(unpack_bitplanes(planes, shape[1]), codes)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_layout_matches_contract_bit_by_bit(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    r, d = 3, 70
    codes = torch.randint(0, 2**bits, (r, d), generator=gen).to(torch.uint8)
    planes = pack_bitplanes(codes, bits)
    for p in range(bits):
        for k in range(r):
            for w in range(planes.shape[2]):
                word = int(planes[p, k, w]) & 0xFFFFFFFF
                for j in range(32):
                    i = 32 * w + j
                    expected = (int(codes[k, i]) >> p) & 1 if i < d else 0  # padding bits are 0
                    assert (word >> j) & 1 == expected


def test_high_bit_words_survive_int32_sign() -> None:
    codes = torch.ones(1, 32, dtype=torch.uint8)  # every bit set: the word is 0xFFFFFFFF == -1 as int32
    planes = pack_bitplanes(codes, 1)
    assert int(planes[0, 0, 0]) == -1
    assert torch.equal(unpack_bitplanes(planes, 32), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_error_within_half_step(bits: int, group_size: int) -> None:
    gen = torch.Generator().manual_seed(bits + group_size)
    m = torch.randn(6, 300, generator=gen) * torch.logspace(-3, 0, 6).unsqueeze(1)
    codes, scales = quantize_groups(m, bits, group_size)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float16
    assert tuple(scales.shape) == (6, -(-300 // group_size))
    assert int(codes.max()) < 2**bits
    recon = dequantize(pack_bitplanes(codes, bits), scales, 300, group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :300]
    # Max-abs scaling never clips, so the error is at most half a step (plus fp16 rounding of the scale).
    assert ((recon - m).abs() <= 0.5 * step * 1.01 + 1e-7).all()


def test_more_bits_less_error() -> None:
    m = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(1, 9):
        codes, scales = quantize_groups(m, bits, 128)
        errors.append(float((dequantize(pack_bitplanes(codes, bits), scales, 512, 128) - m).norm()))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_zero_group_dequantizes_to_zero() -> None:
    m = torch.zeros(2, 64)
    m[1, 32:] = 1.0
    codes, scales = quantize_groups(m, 2, 32)
    recon = dequantize(pack_bitplanes(codes, 2), scales, 64, 32)
    assert torch.equal(recon[0], torch.zeros(64))
    assert torch.allclose(recon[1, 32:], torch.ones(32), atol=1e-3)


def test_midrise_levels_are_symmetric() -> None:
    codes = torch.arange(4, dtype=torch.uint8).view(1, 4)
    planes = pack_bitplanes(codes, 2)
    scales = torch.ones(1, 1, dtype=torch.float16)
    assert dequantize(planes, scales, 4, 32).tolist() == [[-1.5, -0.5, 0.5, 1.5]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quantize_groups(torch.zeros(2, 4), 9, 128), "bits"),
        (lambda: quantize_groups(torch.zeros(2, 4), 2, 100), "group_size"),
        (lambda: quantize_groups(torch.zeros(4), 2, 128), "2-D"),
        (lambda: quantize_groups(torch.tensor([[float("nan")]]), 2, 128), "NaN"),
        (lambda: pack_bitplanes(torch.full((1, 4), 4, dtype=torch.uint8), 2), "values >="),
        (lambda: pack_bitplanes(torch.zeros(1, 4, dtype=torch.int32), 2), "uint8"),
        (lambda: unpack_bitplanes(torch.zeros(2, 1, 2, dtype=torch.int32), 31), "words"),
        (lambda: dequantize(torch.zeros(2, 1, 1, dtype=torch.int32), torch.zeros(1, 2).half(), 31, 128), "scales"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
