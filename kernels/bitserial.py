"""Triton device helpers of the decode (BGMV) kernels: products of bit-plane codes on the CUDA cores.

A decode tile holds one to four rows of one slot (tuning.DECODE_ROWS_POLICY), so tl.dot would pad it to 16 rows and,
worse, the tensor cores need the codes unpacked into their operand layout through shared memory, which cost ~10
instructions an element on the H100 (SASS of the tl.dot kernels, bench/results/kernels.md: 2-7% of copy
bandwidth). Here a thread keeps each 32-bit plane word whole, with no shared memory at all, and the centre
(2^nbits - 1) / 2 comes off once per word through the sum of x. Rows of one tile can share each plane word: the
helpers take a leading row axis.
- fixed_point_range_dots (the shrink and sign kernels, whose bits run along x): x comes as 24-bit fixed point
  (kernels/activation_quant.py). A k tile's planes are first folded into codes held as bytes: bits j, j + 8,
  j + 16, j + 24 of each plane word, rotated into bit p of four bytes, make word c_j (a rotation and a LOP3 a
  word, plane and j). Then c_j meets the four matching bytes of x in one dp4a (IDP.4A), three for x's three
  bytes, once a tile whatever the bit-width, and the centre comes off through x's byte sums, which
  quantize_rows writes. Before this (stop 24), every plane met x on its own: 8 shifts, 8 masks and 24 dp4a
  per 32 bits of a plane and row; before that, an fp32 loop took one bit test and one predicated add a bit.
- add_at_set_bits (the expand kernel, whose bits run along the outputs, each adding one z value): one bit test and
  one predicated add per bit and row.
"""
import triton
import triton.language as tl

from .activation_quant import SUMS_PER_BLOCK, WORDS_PER_BLOCK


@triton.jit
def fixed_point_range_dots(rows_ptrs, row_mask, plane_stride, nbits, n_words, xq_rows, xs_rows, x_ok, k_begin, k_end,
                           scale_ptrs, group_size, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """sum over k in [k_begin, k_end) of (2 * code_k - (2^nbits - 1)) * x_i[k] * scale[k // group_size], fp32
    [X, R], for the R rows of bit planes at rows_ptrs [R] (int32 pointers to each row's word 0 of plane 0; plane p
    at + p * plane_stride; n_words words a row, one per 32 elements of x; masked rows give 0) and the X activation
    rows (rows where x_ok is False read as 0), quantized by activation_quant.quantize_rows: xq_rows [X] point at
    each row's int32 words, xs_rows [X] at its fp32 scales, one per group_size elements, which is also the group of
    V's scales at scale_ptrs [R] (or None: no scales, the sign kernel's). k_begin and BLOCK_K are multiples of 32
    and a tile lies in one scale group (BLOCK_K divides group_size). Each byte of x keeps its own integer sums
    (|sum| < 2^22 over a word's 32 elements, exact in int32); a tile ends with three conversions and one multiply
    by the scales. ASM: dp4a as inline PTX (GPU), else as integer ops (TRITON_INTERPRET=1 cannot run PTX)."""
    acc = tl.zeros((xq_rows.shape[0], rows_ptrs.shape[0], BLOCK_K // 32), dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_K // 32)
    x_sums = xq_rows + WORDS_PER_BLOCK * n_words  # [X]: each row's byte sums, after its blocks
    # Each plane's words are loaded one (tile, plane) step ahead, while the step before runs: a loop-carried load
    # stays in flight across the plane's work, as in the expand decode kernel, instead of a wait on memory at every
    # plane (the fp32 loop before this one got 1.06-1.37x faster so, bench/results/kernel_ab_bitserial_prefetch.md).
    w_next = _plane_words(rows_ptrs, row_mask, plane_stride, n_words, k_begin, k_end, 0, lanes)
    # The tile's scale group, counted along: k0 // group_size with group_size unknown at compile time was an integer
    # division of ~30 instructions a tile (SASS)
    tiles_a_group = group_size // BLOCK_K
    group = k_begin // group_size
    tiles_left = tiles_a_group - (k_begin % group_size) // BLOCK_K
    for k0 in range(k_begin, k_end, BLOCK_K):
        words = k0 // 32 + lanes
        x_mask = x_ok[:, None] & (words < n_words)[None, :]  # [X, NW]
        x_ptrs = xq_rows[:, None] + words[None, :] * WORDS_PER_BLOCK  # word 0 of each 32's block (activation_quant)
        scale = tl.load(xs_rows + group, mask=x_ok, other=0.0)[:, None]  # [X, 1]: x's group scale
        if scale_ptrs is not None:  # times V's: [X, R]
            scale = scale * tl.load(scale_ptrs + group, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        sum_ptrs = x_sums[:, None] + words[None, :] * SUMS_PER_BLOCK
        sum2 = tl.load(sum_ptrs, mask=x_mask, other=0)[:, None, :]  # [X, 1, NW]: sums of x's top bytes,
        sum1 = tl.load(sum_ptrs + 1, mask=x_mask, other=0)[:, None, :]  # middle and low bytes
        sum0 = tl.load(sum_ptrs + 2, mask=x_mask, other=0)[:, None, :]
        # The tile's codes, plane by plane, as bytes: byte i of c_j holds the code of element 8 i + j of the word's
        # 32, the elements whose bytes x's word j of each byte holds. Building them costs 16 instructions a plane
        # word (a rotation, then a rotation and a LOP3 for each c_j but c0's LOP3 alone), and the dp4a come once a
        # tile for all planes: the loop before this one multiplied every plane by x (8 shifts, 8 masks and 24 dp4a a
        # plane word and row).
        c0 = tl.zeros_like(w_next)
        c1, c2, c3, c4, c5, c6, c7 = c0, c0, c0, c0, c0, c0, c0
        for p in range(0, nbits):
            w = w_next
            last = p + 1 >= nbits
            w_next = _plane_words(rows_ptrs, row_mask, plane_stride, n_words, tl.where(last, k0 + BLOCK_K, k0),
                                  k_end, tl.where(last, 0, p + 1), lanes)
            at_p = tl.cast(0x01010101, tl.int32) << p  # bit p of each byte (int32 in the interpreter too)
            w = _rotate_right(w, -p)  # bit j of each byte to bit j + p: then a constant rotation for each c_j
            c0 = c0 | (w & at_p)
            c1 = c1 | (_rotate_right(w, 1) & at_p)
            c2 = c2 | (_rotate_right(w, 2) & at_p)
            c3 = c3 | (_rotate_right(w, 3) & at_p)
            c4 = c4 | (_rotate_right(w, 4) & at_p)
            c5 = c5 | (_rotate_right(w, 5) & at_p)
            c6 = c6 | (_rotate_right(w, 6) & at_p)
            c7 = c7 | (_rotate_right(w, 7) & at_p)
        codes2, codes1, codes0 = _code_dots(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs[:, None, :], x_mask[:, None, :],
                                            ASM)  # [X, R, NW] sum_k code_k * byte_k, per word and byte of x
        odd = (1 << nbits) - 1
        centred = ((2 * codes2 - odd * sum2).to(tl.float32) * 65536.0
                   + (2 * codes1 - odd * sum1).to(tl.float32) * 256.0
                   + (2 * codes0 - odd * sum0).to(tl.float32))
        acc += centred * scale[:, :, None]
        tiles_left -= 1
        group = tl.where(tiles_left == 0, group + 1, group)
        tiles_left = tl.where(tiles_left == 0, tiles_a_group, tiles_left)
    return tl.sum(acc, axis=2)


@triton.jit
def _rotate_right(w, shift):
    """The int32 w rotated right by shift mod 32: one funnel shift (SHF.W), with the shift an immediate when it is a
    constant."""
    u = w.to(tl.uint32, bitcast=True)
    s = tl.cast(shift & 31, tl.uint32)
    return ((u >> s) | (u << ((32 - s) & 31))).to(tl.int32, bitcast=True)


@triton.jit
def _code_dots(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs, x_mask, ASM: tl.constexpr):
    """For each of x's three bytes (top signed, then middle, low): sum over j of dp4a(c_j, x's word j of that
    byte), int32 shaped like the codes broadcast with x_ptrs."""
    if ASM:
        top = tl.zeros_like(tl.broadcast(c0, x_mask)[0])
        top, mid, low = _code_word_dots(c0, x_ptrs, x_mask, top, top, top)
        top, mid, low = _code_word_dots(c1, x_ptrs + 1, x_mask, top, mid, low)
        top, mid, low = _code_word_dots(c2, x_ptrs + 2, x_mask, top, mid, low)
        top, mid, low = _code_word_dots(c3, x_ptrs + 3, x_mask, top, mid, low)
        top, mid, low = _code_word_dots(c4, x_ptrs + 4, x_mask, top, mid, low)
        top, mid, low = _code_word_dots(c5, x_ptrs + 5, x_mask, top, mid, low)
        top, mid, low = _code_word_dots(c6, x_ptrs + 6, x_mask, top, mid, low)
        return _code_word_dots(c7, x_ptrs + 7, x_mask, top, mid, low)
    # The interpreter cannot run PTX, and runs every op in Python: the same sums with j and the four bytes along
    # two new axes, a few dozen numpy calls a tile. The nested joins give [..., a, b, c] = c_(4a + 2b + c), so the
    # reshaped last axis is j.
    codes = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    codes = tl.reshape(codes, (c0.shape[0], c0.shape[1], c0.shape[2], 8))  # the codes are [1, R, NW]
    at = tl.arange(0, 4) * 8
    code_bytes = (tl.expand_dims(codes, -1) >> at) & 0xFF  # [..., 8, 4]
    x_words = tl.expand_dims(x_ptrs, -1) + tl.arange(0, 8)
    ok = tl.expand_dims(x_mask, -1)
    top = tl.expand_dims(tl.load(x_words, mask=ok, other=0), -1)
    mid = tl.expand_dims(tl.load(x_words + 8, mask=ok, other=0), -1)
    low = tl.expand_dims(tl.load(x_words + 16, mask=ok, other=0), -1)
    return (tl.sum(tl.sum(code_bytes * ((top << (24 - at)) >> 24), axis=-1), axis=-1),  # sign-extended
            tl.sum(tl.sum(code_bytes * ((mid >> at) & 0xFF), axis=-1), axis=-1),
            tl.sum(tl.sum(code_bytes * ((low >> at) & 0xFF), axis=-1), axis=-1))


@triton.jit
def _code_word_dots(c, x_ptrs, x_mask, top, mid, low):
    """top, mid, low plus dp4a of c's four unsigned code bytes with the four bytes of x's words at x_ptrs (top,
    signed), x_ptrs + 8 (middle) and x_ptrs + 16 (low)."""
    top = _dp4a(c, tl.load(x_ptrs, mask=x_mask, other=0), top, "s32")
    mid = _dp4a(c, tl.load(x_ptrs + 8, mask=x_mask, other=0), mid, "u32")
    low = _dp4a(c, tl.load(x_ptrs + 16, mask=x_mask, other=0), low, "u32")
    return top, mid, low


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
