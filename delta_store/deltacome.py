"""The `deltacome` method (Delta-CoMe, arXiv 2406.08903): mixed-precision low rank.

A fine-tune delta has a long-tailed spectrum: a few large singular values, then many small ones. The
singular vectors are split into tiers by singular value; the top tier gets many bits, later tiers fewer,
the tail is dropped. Each tier gets a share of the byte budget, so at 2 bits a tier holds 8x the ranks an
FP16 tier would: for a long tail, many coarse directions beat few exact ones.

Per matrix D [d_out, d_in] with input Hessian H (sum of x x^T over calibration tokens, identity without):
1. truncated SVD D ~ U^T diag(s) V at the total rank the tiers can afford;
2. quantize V group-wise (GPTQ against H, or round-to-nearest with MSE-searched scales without H);
3. refit U to the quantized V (least squares of (D - U^T diag(s) V_q) X), so U absorbs V's error;
4. quantize U: with H, GPTQ error feedback against the Hessian of z = diag(s) V_q x; without, RTN + MSE scales;
5. refit s by least squares to the quantized U and V.
Steps 3 and 5 are small least-squares solves that let later factors absorb earlier quantization error
(measured on 512x512 power-law deltas: about a tenth of the quantization loss; cheap, so kept).

How ranks and widths are chosen is allocation.py's job. The budget counts every stored byte: bit
planes, fp16 group scales and fp32 singular values.

Default allocation: `auto:8/4/3/2`, i.e. per matrix, from its own spectrum, each rank gets 8, 4, 3 or
2 bits or is dropped (allocation.AdaptivePlan). Chosen by bench/tier_allocation.py: mean relative
Frobenius error at 1.0 bit/param over power-law spectra (decay 0.5, 0.75, 1.0, spike+tail) at 1024x1024
and 1024x2816 (bench/results/tier_allocation.md):
    auto:8/4/3/2 0.2165 (chosen) | auto:8/7/6/5/4/3/2/1 0.2150 (7 tiers: 0.7% better, not worth the
    extra kernel launches) | auto:8/3/2 0.2204 | fixed 8:0.1,4:0.3,3:0.6 0.2232 | fixed 4-bit 0.2726 |
    Delta-CoMe's 7B setting as byte shares (8:0.008,3:0.047,2:0.945) 0.3528 | svd 0.3174 | bitdelta 0.6468
On a typical 1024x1024 power-1.0 delta it picks 16@8 + 37@4 + 41@3 + 46@2 (rank@bits).
"""

import torch

from .allocation import AdaptivePlan, TierPlan
from .format import LowRankDelta, QuantTier
from .lowrank_svd import truncated_svd
from .packing import pack_bitplanes
from .quantize import dequantize_rows, gptq_rows, gptq_vectors, rtn_quantize

# Singular values below this fraction of the largest are numerically zero: those ranks are not stored.
RANK_TOLERANCE = 1e-5
# Calibration Hessians are dampened by this fraction of their mean diagonal before use: a few hundred
# calibration tokens leave directions that the refits would otherwise fit to noise.
HESSIAN_DAMP = 0.1
# Ridge for the refit solves, relative to the Gram matrix's mean diagonal: guards near-singular Grams.
REFIT_RIDGE = 1e-6


# Measured default (bench/tier_allocation.py): see the module docstring.
DEFAULT_PLAN: TierPlan | AdaptivePlan = AdaptivePlan()


def _trim(tiers: list[tuple[int, int]], keep: int) -> list[tuple[int, int]]:
    """Cut (bits, rank) tiers to `keep` ranks in total (a delta of lower rank than the budget buys)."""
    out = []
    for bits, rank in tiers:
        if keep > 0:
            out.append((bits, min(rank, keep)))
            keep -= rank
    return out


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    g = gram.double()
    g = g + REFIT_RIDGE * torch.diagonal(g).mean().clamp_min(1e-30) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.solve(g, rhs.double()).float()


def compress_deltacome(
    delta: torch.Tensor,
    budget_bytes: int,
    group_size: int,
    plan: TierPlan | AdaptivePlan = DEFAULT_PLAN,
    hessian: torch.Tensor | None = None,
) -> LowRankDelta:
    """delta fp32 [d_out, d_in]; hessian fp32 [d_in, d_in] of the layer's inputs, or None."""
    d_out, d_in = delta.shape
    max_rank = plan.max_rank(d_out, d_in, budget_bytes, group_size)
    if max_rank == 0:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot hold one rank of a {d_out}x{d_in} matrix")
    delta = delta.float()
    _, s, v = truncated_svd(delta, max_rank)  # U is refitted below, so the SVD's own U is not needed
    tiers = plan.ranks(s, d_out, d_in, budget_bytes, group_size)
    tiers = _trim(tiers, int((s > RANK_TOLERANCE * s[0]).sum()))
    rank = sum(r for _, r in tiers)
    s, v = s[:rank], v[:rank]
    if hessian is not None:
        hessian = hessian.float() + HESSIAN_DAMP * torch.diagonal(hessian).mean() * torch.eye(d_in, device=hessian.device)
    bits = torch.tensor([b for b, rank in tiers for _ in range(rank)], device=delta.device)

    v_codes, v_scales = rtn_quantize(v, bits, group_size) if hessian is None else gptq_rows(v, bits, group_size, hessian)
    v_q = dequantize_rows(v_codes, v_scales, bits, group_size)

    target = delta if hessian is None else delta @ hessian  # D H: the objective weights errors by H
    gram_v = v_q @ v_q.T if hessian is None else v_q @ hessian @ v_q.T  # [r, r]
    u = _ridge_solve(gram_v, v_q @ target.T) / s.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    if hessian is None:
        # Without calibration the Hessian of z = diag(s) V_q x is diag(s) V_q V_q^T diag(s), nearly diagonal
        # (V_q's rows are nearly orthogonal), so GPTQ's feedback changes nothing measurable: plain RTN.
        u_codes, u_scales = rtn_quantize(u, bits, group_size)
    else:
        u_codes, u_scales = gptq_vectors(u, bits, group_size, s.unsqueeze(1) * gram_v * s.unsqueeze(0))
    u_q = dequantize_rows(u_codes, u_scales, bits, group_size)

    s = _ridge_solve((u_q @ u_q.T) * gram_v, ((u_q @ target) * v_q).sum(dim=1))

    out, start = [], 0
    for b, rank in tiers:
        rows = slice(start, start + rank)
        start += rank
        out.append(QuantTier(
            b, rank,
            pack_bitplanes(u_codes[rows], b).cpu(), u_scales[rows].cpu(),
            pack_bitplanes(v_codes[rows], b).cpu(), v_scales[rows].cpu(),
            s[rows].cpu(),
        ))
    return LowRankDelta((d_out, d_in), out)
