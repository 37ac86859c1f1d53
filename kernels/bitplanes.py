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
    BLOCK_K / 32 words per row. Masked rows and words past n_words read as 0.
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
