"""Triton device helpers for the launch grid of SlotMetadata: which kernel takes a row tile, which rows it holds,
and which piece of the reduction axis a split-K program takes. Shared by the shrink, expand and sign kernels."""
import triton
import triton.language as tl

# Row tiles of at most this many rows go to the decode (bit-serial) kernels, taller ones to the tl.dot (SGMV)
# kernels: a decode program walks every bit once per row, a tl.dot program once per tile of up to 64 rows.
DECODE_MAX_ROWS = tl.constexpr(2)


@triton.jit
def segment_tile_rows(sorted_rows_ptr, seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg,
                      BLOCK_M: tl.constexpr):
    """Rows (int64 [BLOCK_M], 0 where masked) and their mask for row tile pid_m of segment seg (seg >= 0):
    BLOCK_M consecutive entries of the slot-sorted row order, cut at the segment's end."""
    offs_m = tl.load(blk_start_ptr + pid_m) + tl.arange(0, BLOCK_M)
    m_mask = offs_m < tl.load(seg_starts_ptr + seg) + tl.load(seg_lens_ptr + seg)
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    return rows, m_mask


@triton.jit
def split_k_range(d_in, split, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_begin, k_end) of piece `split` of SPLIT_K equal pieces of d_in, each a whole number of BLOCK_K tiles."""
    k_chunk = tl.cdiv(tl.cdiv(d_in, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = split * k_chunk
    return k_begin, tl.minimum(k_begin + k_chunk, d_in)


@triton.jit
def kernel_tile(blk_seg_ptr, seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, BLOCK_M: tl.constexpr,
                DECODE: tl.constexpr):
    """(segment, row count) of row tile pid_m for a decode kernel (DECODE) or a tl.dot kernel: segment -1 when
    the tile is padding of static metadata or the other kind's (at most / more than DECODE_MAX_ROWS rows)."""
    seg = tl.load(blk_seg_ptr + pid_m)
    real = tl.maximum(seg, 0)  # padding tiles read segment 0, which static metadata always has
    seg_end = tl.load(seg_starts_ptr + real) + tl.load(seg_lens_ptr + real)
    n_rows = tl.minimum(seg_end - tl.load(blk_start_ptr + pid_m), BLOCK_M)
    if DECODE:
        mine = n_rows <= DECODE_MAX_ROWS
    else:
        mine = n_rows > DECODE_MAX_ROWS
    return tl.where(mine, seg, -1), n_rows
