"""Triton device helper shared by the delta kernels: a tile of bit-plane codes, unpacked in registers.

Layout (deltaserve.delta_store.packing): bit j of word w of plane p holds bit p of element 32 * w + j.
"""
import triton
import triton.language as tl


@triton.jit
def unpack_tile(planes_ptr, plane_stride, row_stride, offs_r, r_mask, word0, n_words, nbits,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes int32 [BLOCK_R, BLOCK_K] of rows offs_r, elements 32 * word0 + [0, BLOCK_K).

    nbits is a runtime value (bit-width per slot): one pass over the planes, each pass one load of
    BLOCK_K / 32 words per row, whose 32 bits are spread by a broadcast shift. (Loading each element's word
    separately, as GPTQ-Triton kernels do, measured L1-bound and slower on the H100.) Masked rows and words
    past n_words read as 0.
    """
    words = word0 + tl.arange(0, BLOCK_K // 32)
    mask = r_mask[:, None] & (words[None, :] < n_words)
    ptrs = planes_ptr + offs_r[:, None].to(tl.int64) * row_stride + words[None, :]
    shifts = tl.arange(0, 32)
    codes = tl.zeros((BLOCK_R, BLOCK_K // 32, 32), dtype=tl.int32)
    for p in range(0, nbits):
        w = tl.load(ptrs + p * plane_stride, mask=mask, other=0)
        codes |= ((w[:, :, None] >> shifts[None, None, :]) & 1) << p
    return tl.reshape(codes, (BLOCK_R, BLOCK_K))


@triton.jit
def centred_codes(codes, nbits, DOT_DTYPE: tl.constexpr):
    """2 * code - (2^nbits - 1): odd integers of magnitude <= 255, exact in DOT_DTYPE, i.e. twice the centred
    code (callers halve the scale). Built with integer ops and one add through the float's bit pattern
    (0x4B000000 | n is 2^23 + n in fp32, 0x6400 | n is 1024 + n in fp16): the int-to-float and float-to-half
    conversion units run at 1/8 of the ALU rate, and two conversions per code would cap the kernels."""
    odd = (1 << nbits) - 1
    if DOT_DTYPE == tl.float16:
        h = ((codes * 2) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        out = h - (1024 + odd).to(tl.float16)
    else:
        out = ((codes * 2) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608 + odd).to(tl.float32)
        if DOT_DTYPE == tl.bfloat16:  # exact in bf16, so its bits are the top half of the fp32 bits
            out = (out.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return out
