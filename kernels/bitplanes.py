"""Triton device helpers shared by the delta kernels: a tile of bit-plane codes, unpacked and centred in registers.

Layout (deltaserve.delta_store.packing): bit j of word w of plane p holds bit p of element 32 * w + j.

Unpacking costs more than the matmul (decode reads each code once), so there are two strategies, a
tl.constexpr UNPACK in the launch configs (kernels/tuning.py; bench/tune_kernels.py times both per GPU):
- UNPACK_PLANES: load BLOCK_K / 32 words per row and spread each word's 32 bits over a [R, K/32, 32] tensor
  by a broadcast shift, then reshape;
- UNPACK_PAIRS: two codes per int32, bits j and j + 16 of a word going to the two 16-bit halves, so every
  shift, mask and add handles two elements, and for fp16 the centring too (two fp16 bit patterns per word).
  The tile's K axis then comes out permuted within each 32 elements (see tile_offsets): callers index x, or
  their output columns, through the same permutation, which leaves the dot product unchanged.
(A third, each element loading its own word k // 32 and shifting by k % 32 with no 3-D tensor, measured 3-4x
slower than both on the H100 in an earlier kernel_bench mode.) Both load plane p + 1 before
unpacking plane p, so a tile waits for memory once rather than once per plane (decode is latency-bound:
this took 10-15% off the expand kernel).
Every strategy returns the same numbers, 2 * code - (2^nbits - 1) (odd integers of magnitude <= 255, exact in
the dot dtype): twice the centred code, so callers halve the scale.
"""
import triton
import triton.language as tl

UNPACK_PLANES = tl.constexpr(0)
UNPACK_PAIRS = tl.constexpr(1)
UNPACK_NAMES = ("planes", "pairs")  # by UNPACK value: how configs and benchmarks name them


@triton.jit
def tile_offsets(BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):
    """Element offsets [BLOCK_K] (within the tile) of the K axis of unpack_centred's tile: 0..BLOCK_K-1 in
    order, except with UNPACK_PAIRS, where position 2 * j + h of each 32 holds element 16 * h + j."""
    i = tl.arange(0, BLOCK_K)
    if UNPACK == UNPACK_PAIRS:
        i = (i // 32) * 32 + (i % 2) * 16 + (i % 32) // 2
    return i


@triton.jit
def unpack_centred(planes_ptr, plane_stride, row_stride, offs_r, r_mask, word0, n_words, nbits,
                   DOT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):
    """2 * code - (2^nbits - 1) in DOT_DTYPE [BLOCK_R, BLOCK_K] for rows offs_r, elements 32 * word0 +
    tile_offsets(BLOCK_K, UNPACK). nbits is a runtime value (bit-width per slot). Masked rows and words past
    n_words read as code 0."""
    odd = (1 << nbits) - 1
    if UNPACK == UNPACK_PAIRS:
        words = word0 + tl.arange(0, BLOCK_K // 32)
        mask = r_mask[:, None] & (words[None, :] < n_words)
        ptrs = planes_ptr + offs_r[:, None].to(tl.int64) * row_stride + words[None, :]
        shifts = tl.arange(0, 16)
        pair = tl.zeros((BLOCK_R, BLOCK_K // 32, 16), dtype=tl.int32)  # codes of elements j (low half), j + 16
        w = _plane(ptrs, plane_stride, mask, nbits - 1, nbits)
        for i in range(0, nbits):  # planes high to low: pair = 2 * pair + bit, both halves at once
            after = _plane(ptrs, plane_stride, mask, nbits - 2 - i, nbits)
            pair = pair * 2 + ((w[:, :, None] >> shifts[None, None, :]) & 0x10001)
            w = after
        if DOT_DTYPE == tl.float16:
            # 0x6400 | n is the fp16 1024 + n: both halves' doubled codes become fp16 bit patterns in one OR.
            h = (pair * 2) | 0x64006400
            lo = h.to(tl.int16).to(tl.float16, bitcast=True)
            hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True)
            centre = (1024 + odd).to(tl.float16)
            out = tl.join(lo - centre, hi - centre)
        else:
            out = tl.join(_centred(pair & 0xFFFF, odd, DOT_DTYPE), _centred(pair >> 16, odd, DOT_DTYPE))
        return tl.reshape(out, (BLOCK_R, BLOCK_K))  # [R, K/32, 16, 2]: position 2 * j + h holds element 16h + j
    # UNPACK_PLANES
    words = word0 + tl.arange(0, BLOCK_K // 32)
    mask = r_mask[:, None] & (words[None, :] < n_words)
    ptrs = planes_ptr + offs_r[:, None].to(tl.int64) * row_stride + words[None, :]
    shifts = tl.arange(0, 32)
    codes = tl.zeros((BLOCK_R, BLOCK_K // 32, 32), dtype=tl.int32)
    w = _plane(ptrs, plane_stride, mask, 0, nbits)
    for p in range(0, nbits):
        after = _plane(ptrs, plane_stride, mask, p + 1, nbits)
        codes |= ((w[:, :, None] >> shifts[None, None, :]) & 1) << p
        w = after
    return _centred(tl.reshape(codes, (BLOCK_R, BLOCK_K)), odd, DOT_DTYPE)


@triton.jit
def _plane(ptrs, plane_stride, mask, p, nbits):
    """Words [R, K/32] of plane p at ptrs, zeros where p is outside [0, nbits) (the load after the last plane)."""
    pv = mask.to(tl.int32) * 0 + p  # p as a tensor: the interpreter cannot mask with a Python bool
    return tl.load(ptrs + p * plane_stride, mask=mask & (pv >= 0) & (pv < nbits), other=0)


@triton.jit
def _centred(codes, odd, DOT_DTYPE: tl.constexpr):
    """2 * codes - odd in DOT_DTYPE, codes int32 < 256. Built with integer ops and one add through the float's
    bit pattern (0x4B000000 | n is 2^23 + n in fp32, 0x6400 | n is 1024 + n in fp16): the int-to-float and
    float-to-half conversion units run at 1/8 of the ALU rate, and two conversions per code would cap the kernels."""
    if DOT_DTYPE == tl.float16:
        h = ((codes * 2) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        out = h - (1024 + odd).to(tl.float16)
    else:
        out = ((codes * 2) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608 + odd).to(tl.float32)
        if DOT_DTYPE == tl.bfloat16:  # exact in bf16, so its bits are the top half of the fp32 bits
            out = (out.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return out
