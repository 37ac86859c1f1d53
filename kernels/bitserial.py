"""Triton device helpers of the decode (BGMV) kernels: products of bit-plane codes on the CUDA cores.

A decode tile holds one to four rows of one slot (tuning.DECODE_ROWS_POLICY), so tl.dot would pad it to 16 rows and,
worse, the tensor cores need the codes unpacked into their operand layout through shared memory, which cost ~10
instructions an element on the H100 (SASS of the tl.dot kernels, bench/results/kernels.md: 2-7% of copy
bandwidth). Here a thread keeps each 32-bit plane word whole, with no shared memory at all, and codes are never
built: sum_k code_k x_k is sum_p 2^p sum_k bit_pk x_k, and the centre (2^nbits - 1) / 2 comes off once per word
through the sum of x. Rows of one tile can share each plane word: the helpers take a leading row axis.
- fixed_point_range_dots (the shrink and sign kernels, whose bits run along x): x comes as 24-bit fixed point
  (kernels/activation_quant.py). Bits j, j + 8, j + 16, j + 24 of a word, masked out as four bytes, meet the four
  matching bytes of x in one dp4a (IDP.4A), three for x's three bytes: per 32 bits of a plane and row 8 shifts, 8
  masks and 24 dp4a. The fp32 loop before it took one bit test and one predicated add a bit (LOP3.P + @P FADD):
  303 against 217 instructions a plane at the shrink's default config (bench/results/kernel_sass_dp4a_defaults.md).
- add_at_set_bits (the expand kernel, whose bits run along the outputs, each adding one z value): one bit test and
  one predicated add per bit and row.
"""
import triton
import triton.language as tl

from .activation_quant import WORDS_PER_BLOCK

@triton.jit
def fixed_point_range_dots(rows_ptrs, row_mask, plane_stride, nbits, n_words, xq_rows, xs_rows, x_ok, k_begin, k_end,
                           scale_ptrs, group_size, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """sum over k in [k_begin, k_end) of (2 * code_k - (2^nbits - 1)) * x_i[k] * scale[k // group_size], fp32
    [X, R], for the R rows of bit planes at rows_ptrs [R] (int32 pointers to each row's word 0 of plane 0; plane p
    at + p * plane_stride; n_words words a row; masked rows give 0) and the X activation rows (rows where x_ok is
    False read as 0), quantized by activation_quant.quantize_rows: xq_rows [X] point at each row's int32 words,
    xs_rows [X] at its fp32 scales, one per group_size elements, which is also the group of V's scales at
    scale_ptrs [R] (or None: no scales, the sign kernel's). k_begin and BLOCK_K are multiples of 32 and a tile
    lies in one scale group (BLOCK_K divides group_size). Each byte of x keeps its own integer sums (|sum| < 2^22
    over a word's 32 elements, exact in int32); a tile ends with three conversions and one multiply by the scales.
    ASM: dp4a as inline PTX (GPU), else as integer ops (TRITON_INTERPRET=1 cannot run PTX)."""
    acc = tl.zeros((xq_rows.shape[0], rows_ptrs.shape[0], BLOCK_K // 32), dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_K // 32)
    every_bit = tl.full((1, 1), -1, tl.int32)  # a plane word of all ones: _byte_dots then sums x's bytes
    # Each plane's words are loaded one (tile, plane) step ahead, while the step before runs: a loop-carried load
    # stays in flight across the dp4a loop, as in the expand decode kernel, instead of a wait on memory at every
    # plane (the fp32 loop before this one got 1.06-1.37x faster so, bench/results/kernel_ab_bitserial_prefetch.md).
    w_next = _plane_words(rows_ptrs, row_mask, plane_stride, n_words, k_begin, k_end, 0, lanes)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words = k0 // 32 + lanes
        x_mask = x_ok[:, None] & (words < n_words)[None, :]  # [X, NW]
        x_ptrs = xq_rows[:, None] + words[None, :] * WORDS_PER_BLOCK  # word 0 of each 32's block (activation_quant)
        scale = tl.load(xs_rows + k0 // group_size, mask=x_ok, other=0.0)[:, None]  # [X, 1]: x's group scale
        if scale_ptrs is not None:  # times V's: [X, R]
            scale = scale * tl.load(scale_ptrs + k0 // group_size, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        # The loads of x below are loop-invariant: ptxas keeps a tile's 24 words a row in registers.
        sum2, sum1, sum0 = _byte_dots(every_bit, x_ptrs, x_mask, ASM)  # [X, NW] sums of x's bytes
        codes2 = tl.zeros(acc.shape, dtype=tl.int32)  # sum_k code_k * byte_k, per word and byte of x
        codes1 = tl.zeros(acc.shape, dtype=tl.int32)
        codes0 = tl.zeros(acc.shape, dtype=tl.int32)
        for p in range(0, nbits):
            w = w_next
            last = p + 1 >= nbits
            w_next = _plane_words(rows_ptrs, row_mask, plane_stride, n_words, tl.where(last, k0 + BLOCK_K, k0),
                                  k_end, tl.where(last, 0, p + 1), lanes)
            plane2, plane1, plane0 = _byte_dots(w, x_ptrs[:, None, :], x_mask[:, None, :], ASM)
            codes2 += plane2 << p
            codes1 += plane1 << p
            codes0 += plane0 << p
        odd = (1 << nbits) - 1
        centred = ((2 * codes2 - odd * sum2[:, None, :]).to(tl.float32) * 65536.0
                   + (2 * codes1 - odd * sum1[:, None, :]).to(tl.float32) * 256.0
                   + (2 * codes0 - odd * sum0[:, None, :]).to(tl.float32))
        acc += centred * scale[:, :, None]
    return tl.sum(acc, axis=2)


@triton.jit
def _byte_dots(w, x_ptrs, x_mask, ASM: tl.constexpr):
    """For each of x's three bytes (top signed, then middle, low): sum over j of dp4a(bits j, j + 8, j + 16, j + 24
    of w as bytes, x's word j of that byte), int32 shaped like w broadcast with x_ptrs."""
    if ASM:
        top = tl.zeros_like(tl.broadcast(w, x_mask)[0])  # int32, shaped like w and x together
        mid = tl.zeros_like(top)
        low = tl.zeros_like(top)
        for j in tl.static_range(8):
            bits = (w >> j) & 0x01010101
            top = _dp4a(bits, tl.load(x_ptrs + j, mask=x_mask, other=0), top, "s32")
            mid = _dp4a(bits, tl.load(x_ptrs + 8 + j, mask=x_mask, other=0), mid, "u32")
            low = _dp4a(bits, tl.load(x_ptrs + 16 + j, mask=x_mask, other=0), low, "u32")
        return top, mid, low
    # The interpreter runs every op, and every call of a jit function, in Python: the same sums with j and the four
    # bytes along two new axes, a few dozen numpy calls a plane instead of hundreds.
    j = tl.arange(0, 8)
    at = tl.arange(0, 4) * 8
    bits = tl.expand_dims((tl.expand_dims(w, -1) >> j) & 0x01010101, -1)  # [..., 8, 1]
    bit_bytes = (bits >> at) & 0xFF  # [..., 8, 4]
    x_words = tl.expand_dims(x_ptrs, -1) + j
    x_ok = tl.expand_dims(x_mask, -1)
    top = tl.expand_dims(tl.load(x_words, mask=x_ok, other=0), -1)
    mid = tl.expand_dims(tl.load(x_words + 8, mask=x_ok, other=0), -1)
    low = tl.expand_dims(tl.load(x_words + 16, mask=x_ok, other=0), -1)
    return (tl.sum(tl.sum(bit_bytes * ((top << (24 - at)) >> 24), axis=-1), axis=-1),  # sign-extended
            tl.sum(tl.sum(bit_bytes * ((mid >> at) & 0xFF), axis=-1), axis=-1),
            tl.sum(tl.sum(bit_bytes * ((low >> at) & 0xFF), axis=-1), axis=-1))


@triton.jit
def _dp4a(a, b, c, B_TYPE: tl.constexpr):
    """c + the dot product of the four unsigned bytes of a with the four bytes of b (B_TYPE "s32": signed, "u32":
    unsigned), int32: one IDP.4A."""
    return tl.inline_asm_elementwise("dp4a.u32." + B_TYPE + " $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _plane_words(rows_ptrs, row_mask, plane_stride, n_words, k0, k_end, p, lanes):
    """Words [1, R, NW] of plane p in the tile at element k0 (zeros from k_end on: the load after the last tile).
    Shaped like the bit loop's [X, R, NW] sums, so the loop-carried words keep the layout of their bit tests: as
    [R, NW] every bit test went through a layout conversion, doubling the loop's instructions (SASS)."""
    words = k0 // 32 + lanes
    # k_end is a multiple of 32 or d_in itself, so this is the whole tile's test k0 < k_end, made per word (the
    # interpreter cannot mask with a scalar)
    mask = row_mask[None, :, None] & ((words < n_words) & (words * 32 < k_end))[None, None, :]
    return tl.load(rows_ptrs[None, :, None] + words[None, None, :] + p * plane_stride, mask=mask, other=0)


@triton.jit
def add_at_set_bits(acc, words, zs):
    """acc [X, 32, NW] fp32 plus zs [X, NW] where the bit is set: acc[i, j, w] += zs[i, w] if bit j of words[w]
    is 1. The bit index comes before the word so that a thread holds all 32 bits of its words (a word per lane,
    loaded once) for all X rows, which share each bit test."""
    jr = tl.arange(0, 32)
    bit = ((words[None, :] >> jr[:, None]) & 1) != 0
    return tl.where(bit[None, :, :], acc + zs[:, None, :], acc)
