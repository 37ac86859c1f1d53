"""Triton device helpers for the launch grid of SlotMetadata: which rows a row tile holds, and which piece of
the reduction axis a split-K program takes. Shared by the shrink, expand and sign kernels."""
import triton
import triton.language as tl


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
def split_k_range(d_in, split, BLOCK_K: tl.constexpr, SPLIT_K):
    """[k_begin, k_end) of piece `split` of SPLIT_K equal pieces of d_in, each a whole number of BLOCK_K tiles; empty
    (k_begin >= k_end) for the last pieces when SPLIT_K exceeds the k tiles (a tuned split may: 64 over 32 tiles)."""
    k_chunk = tl.cdiv(tl.cdiv(d_in, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = split * k_chunk
    return k_begin, tl.minimum(k_begin + k_chunk, d_in)


@triton.jit
def tile_row_count(seg_starts_ptr, seg_lens_ptr, blk_start_ptr, pid_m, seg, BLOCK_M):
    """How many rows row tile pid_m of segment seg holds (1..BLOCK_M): the decode and tl.dot kernels split the
    tiles between them by it."""
    seg_end = tl.load(seg_starts_ptr + seg) + tl.load(seg_lens_ptr + seg)
    return tl.minimum(seg_end - tl.load(blk_start_ptr + pid_m), BLOCK_M)


@triton.jit
def decode_tile_rows(sorted_rows_ptr, blk_start_ptr, pid_m, n_rows, DECODE_ROWS: tl.constexpr):
    """Rows (int64 [DECODE_ROWS], 0 where masked) and their mask of a decode kernel's row tile pid_m, which holds
    n_rows <= DECODE_ROWS rows."""
    offs = tl.arange(0, DECODE_ROWS)
    ok = offs < n_rows
    return tl.load(sorted_rows_ptr + tl.load(blk_start_ptr + pid_m) + offs, mask=ok, other=0).to(tl.int64), ok
