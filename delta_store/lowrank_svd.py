"""The `svd` method: plain truncated low rank in FP16 at the byte budget (the low-rank baseline), and the
truncated SVD that deltacome starts from."""

import torch

from .format import FloatTier, LowRankDelta

# Below this fraction of the full rank of a large matrix a randomized SVD is much faster than a full one
# and, with a few power iterations and some oversampling, as accurate on the leading directions.
LOWRANK_FRACTION = 1 / 8
LOWRANK_MIN_DIM = 1024
OVERSAMPLE = 16
POWER_ITERATIONS = 4


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `rank` singular triplets of delta [d_out, d_in] -> (u [r, d_out], s [r], v [r, d_in]), fp32."""
    delta = delta.float()
    full = min(delta.shape)
    if full >= LOWRANK_MIN_DIM and rank <= full * LOWRANK_FRACTION:
        u, s, v = torch.svd_lowrank(delta, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        return u[:, :rank].T.contiguous(), s[:rank], v[:, :rank].T.contiguous()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank].T.contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()


def fp16_rank_bytes(d_out: int, d_in: int) -> int:
    """Bytes of one rank of a float tier: u and v in fp16, s in fp32."""
    return 2 * (d_out + d_in) + 4


def compress_svd(delta: torch.Tensor, budget_bytes: int) -> LowRankDelta:
    d_out, d_in = delta.shape
    rank = min(budget_bytes // fp16_rank_bytes(d_out, d_in), d_out, d_in)
    if rank == 0:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot hold one FP16 rank of a {d_out}x{d_in} matrix")
    u, s, v = truncated_svd(delta, rank)
    # Singular vectors have unit norm, so fp16 holds them without overflow; magnitudes stay in fp32 s.
    tier = FloatTier(u.half().cpu(), v.half().cpu(), s.float().cpu())
    return LowRankDelta((d_out, d_in), [tier])
