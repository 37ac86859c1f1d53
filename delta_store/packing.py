"""Group quantization and bit-plane packing of low-rank factors.

This is the one packing layout shared by the compressor, the file format and the Triton kernels.

A quantized factor is r vectors of length d, held as integer codes in [0, 2^b):
- Quantizer: symmetric mid-rise with one fp16 scale per group of `group_size` consecutive elements
  of a vector: value = (code - (2^b - 1) / 2) * scale[k, i // group_size]. Mid-rise has no zero level,
  so every code carries sign information, which is what low-bit singular vectors need.
- Bit planes: planes int32 [b, r, ceil(d / 32)]; bit j (LSB = 0) of word planes[p, k, w] is bit p of
  codes[k, 32 * w + j]; elements past d are 0. Every bit width 1..8 uses the same layout, so a kernel
  reads plane p of a 32-element chunk with one load and needs no special case per width.
"""

import torch

WORD_BITS = 32
MAX_BITS = 8


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % WORD_BITS:
        raise ValueError(f"group_size must be a positive multiple of {WORD_BITS}, got {group_size!r}")


def num_groups(d: int, group_size: int) -> int:
    return -(-d // group_size)


def num_words(d: int) -> int:
    return -(-d // WORD_BITS)


def mid_level(bits: int) -> float:
    """Offset that centres the codes: code c stands for (c - mid_level) * scale."""
    return (2**bits - 1) / 2


def expand_scales(scales: torch.Tensor, d: int, group_size: int) -> torch.Tensor:
    """fp16 [r, ceil(d/G)] -> fp32 [r, d], one scale per element."""
    return scales.float().repeat_interleave(group_size, dim=1)[:, :d]


def codes_for_scales(m: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest codes of m [r, d] under given fp16 scales [r, ceil(d/G)] -> uint8 [r, d]."""
    step = expand_scales(scales, m.shape[1], group_size)
    # A zero scale (all-zero group) dequantizes to 0 whatever the code; avoid 0/0 here.
    q = torch.round(m.float() / step.clamp_min(torch.finfo(torch.float32).tiny) + mid_level(bits))
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_groups(m: torch.Tensor, bits: int, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-abs group quantization of m [r, d] fp32 -> (codes uint8 [r, d], scales fp16 [r, ceil(d/G)]).

    The scale maps the group's largest magnitude onto the outermost level, so nothing clips.
    """
    check_bits(bits)
    check_group_size(group_size)
    if m.dim() != 2:
        raise ValueError(f"m must be 2-D [r, d], got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("m contains NaN or Inf")
    r, d = m.shape
    pad = num_groups(d, group_size) * group_size - d
    absmax = torch.nn.functional.pad(m.float().abs(), (0, pad)).view(r, -1, group_size).amax(dim=2)
    scales = (absmax / mid_level(bits)).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("m has values too large for an fp16 group scale")
    return codes_for_scales(m, scales, bits, group_size), scales


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [r, d] -> int32 planes [bits, r, ceil(d/32)]."""
    check_bits(bits)
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [r, d], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes has values >= 2^{bits}")
    r, d = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, num_words(d) * WORD_BITS - d))
    chunks = padded.view(r, -1, WORD_BITS)  # [r, W, 32]
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=codes.device) << torch.arange(
        WORD_BITS, device=codes.device
    )
    planes = torch.stack([(((chunks >> p) & 1) * weights).sum(dim=2) for p in range(bits)])
    # Words are built as unsigned 32-bit values; store the same bits as two's-complement int32.
    planes = torch.where(planes >= 2**31, planes - 2**32, planes)
    return planes.to(torch.int32)


def unpack_bitplanes(planes: torch.Tensor, d: int) -> torch.Tensor:
    """int32 planes [b, r, ceil(d/32)] -> uint8 codes [r, d]."""
    if planes.dim() != 3 or planes.dtype != torch.int32:
        raise ValueError(f"planes must be int32 [b, r, words], got {planes.dtype} {tuple(planes.shape)}")
    bits, r, words = planes.shape
    check_bits(bits)
    if words != num_words(d):
        raise ValueError(f"planes has {words} words per vector, d={d} needs {num_words(d)}")
    shifts = torch.arange(WORD_BITS, device=planes.device)
    unsigned = planes.to(torch.int64) & 0xFFFFFFFF
    bit = (unsigned.unsqueeze(-1) >> shifts) & 1  # [b, r, W, 32]
    codes = torch.zeros(r, words * WORD_BITS, dtype=torch.int64, device=planes.device)
    for p in range(bits):
        codes |= bit[p].reshape(r, -1) << p
    return codes[:, :d].to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """uint8 codes [r, d] + fp16 scales [r, ceil(d/G)] -> fp32 [r, d]."""
    return (codes.float() - mid_level(bits)) * expand_scales(scales, codes.shape[1], group_size)


def dequantize(planes: torch.Tensor, scales: torch.Tensor, d: int, group_size: int) -> torch.Tensor:
    """int32 planes [b, r, ceil(d/32)] + fp16 scales [r, ceil(d/G)] -> fp32 [r, d]; b = planes.shape[0]."""
    check_group_size(group_size)
    bits, r, _ = planes.shape
    if tuple(scales.shape) != (r, num_groups(d, group_size)):
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match [{r}, {num_groups(d, group_size)}] "
            f"for d={d}, group_size={group_size}"
        )
    return dequantize_codes(unpack_bitplanes(planes, d), scales, bits, group_size)
