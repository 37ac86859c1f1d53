"""Quantizers for the singular vectors of a delta, producing codes and fp16 scales in the packing.py layout.

- `rtn_quantize`: round-to-nearest with, per group, the scale that minimises the group's squared error
  (searched over shrunken max-abs scales: at 2-3 bits clipping a few outliers beats covering them).
- `gptq_rows`: GPTQ (Frantar et al. 2022) for a factor V [r, d_in] applied to inputs x with Hessian
  H = sum x x^T: columns are quantized left to right and each column's error is spread over the columns not
  yet quantized through the inverse Hessian, so the error of V x (not of V) is minimised. Groups run along
  the columns, matching the packing layout's groups along each vector.
- `gptq_vectors`: the same error feedback for a factor U [r, d_out] applied as U^T z with Hessian Hz [r, r]:
  here the unit quantized at once is a whole vector u_k (its groups run along d_out), and its error is
  spread over the vectors not yet quantized.
Each row of a factor may have its own bit width (tiers of one matrix are quantized together).
"""

import torch

from .packing import check_group_size, codes_for_scales, expand_scales, num_groups

# Candidate scales as fractions of the max-abs scale (1-bit codes want ~0.3, 8-bit ones 1.0 = no clipping).
SHRINK_GRID = torch.linspace(0.2, 1.0, 33)
# Elements scored at once by the scale search (candidates x rows x group): bounds its memory to ~64 MB.
SEARCH_CHUNK_ELEMENTS = 1 << 24
# Hessian dampening relative to its mean diagonal, as in GPTQ: keeps the Cholesky factorisation stable.
DAMP = 0.01


def _best_scales(groups: torch.Tensor, bits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """groups fp32 [n, G], bits int [n] -> fp16 scales [n] minimising each group's squared error.

    valid bool [n, G] marks real elements when groups were zero-padded (padding is not scored).
    All candidate scales are scored at once, in row chunks of bounded size (GPTQ calls this per column
    or per vector, so one launch per candidate would dominate its run time)."""
    n, width = groups.shape
    rows = max(1, SEARCH_CHUNK_ELEMENTS // (len(SHRINK_GRID) * width))
    return torch.cat([
        _best_scales_chunk(groups[i : i + rows], bits[i : i + rows], None if valid is None else valid[i : i + rows])
        for i in range(0, n, rows)
    ])


def _best_scales_chunk(groups: torch.Tensor, bits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    maxq = (2.0**bits.float() - 1).unsqueeze(1)  # [n, 1]
    mid = maxq / 2
    absmax = groups.abs().amax(dim=1, keepdim=True)  # [n, 1]
    shrink = SHRINK_GRID.to(groups.device).view(-1, 1, 1)  # [S, 1, 1]
    scale = (shrink * absmax / mid).to(torch.float16)  # [S, n, 1]: score the fp16 scale that will be stored
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = (torch.round(groups / step + mid).clamp(torch.zeros_like(maxq), maxq) - mid) * scale.float()
    err = (q - groups).square()  # [S, n, G]
    err = (err if valid is None else err * valid).sum(dim=2)
    return scale.squeeze(2).gather(0, err.argmin(dim=0, keepdim=True)).squeeze(0)  # first best on ties


def _check_finite_scales(scales: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(scales).all():
        raise ValueError("a singular vector has values too large for an fp16 group scale")
    return scales


def rtn_quantize(m: torch.Tensor, bits: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m fp32 [r, d], bits int [r] -> (codes uint8 [r, d], scales fp16 [r, ceil(d/G)]); codes use each row's bits.

    Rows of different widths are returned in one codes tensor; callers pack each tier's rows separately.
    """
    check_group_size(group_size)
    r, d = m.shape
    n = num_groups(d, group_size)
    pad = n * group_size - d
    groups = torch.nn.functional.pad(m.float(), (0, pad)).reshape(r * n, group_size)
    valid = torch.nn.functional.pad(torch.ones_like(m, dtype=torch.bool), (0, pad)).reshape(r * n, group_size)
    scales = _check_finite_scales(_best_scales(groups, bits.repeat_interleave(n), valid).view(r, n))
    return _codes(m, scales, bits, group_size), scales


def _codes(m: torch.Tensor, scales: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    codes = torch.empty(m.shape, dtype=torch.uint8, device=m.device)
    for b in bits.unique().tolist():
        rows = bits == b
        codes[rows] = codes_for_scales(m[rows], scales[rows], int(b), group_size)
    return codes


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of the quantizers here for rows of mixed widths: codes uint8 [r, d] -> fp32 [r, d]."""
    mid = ((2.0 ** bits.float() - 1) / 2).unsqueeze(1)
    return (codes.float() - mid) * expand_scales(scales, codes.shape[1], group_size)


def _upper_inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened Hessian (GPTQ's error-propagation matrix)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # inputs that never fire: any value is exact, keep the matrix invertible
    h += DAMP * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq_rows(
    m: torch.Tensor, bits: torch.Tensor, group_size: int, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """m fp32 [r, d] used as m @ x, hessian [d, d] -> (codes uint8 [r, d], scales fp16 [r, ceil(d/G)])."""
    check_group_size(group_size)
    r, d = m.shape
    hinv = _upper_inverse_cholesky(hessian)
    w = m.float().clone()
    maxq = (2.0 ** bits.float() - 1).unsqueeze(1)
    mid = maxq / 2
    scales = torch.zeros(r, num_groups(d, group_size), dtype=torch.float16, device=m.device)
    codes = torch.zeros(r, d, dtype=torch.uint8, device=m.device)
    # One block = one group: the group's scale is chosen after all earlier blocks' errors were applied.
    for start in range(0, d, group_size):
        end = min(start + group_size, d)
        block = w[:, start:end].clone()
        scale = _best_scales(block, bits)
        scales[:, start // group_size] = scale
        step = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            col = block[:, j : j + 1]
            code = torch.round(col / step + mid).clamp(torch.zeros_like(maxq), maxq)
            codes[:, start + j] = code.squeeze(1).to(torch.uint8)
            err = (col - (code - mid) * scale.float().unsqueeze(1)) / hinv[start + j, start + j]
            block[:, j + 1 :] -= err @ hinv[start + j : start + j + 1, start + j + 1 : end]
            errors[:, j : j + 1] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes, _check_finite_scales(scales)


def gptq_vectors(
    m: torch.Tensor, bits: torch.Tensor, group_size: int, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """m fp32 [r, d] used as m^T @ z, hessian [r, r] of z -> (codes uint8 [r, d], scales fp16 [r, ceil(d/G)])."""
    check_group_size(group_size)
    hinv = _upper_inverse_cholesky(hessian)
    w = m.float().clone()
    codes = torch.zeros(w.shape, dtype=torch.uint8, device=m.device)
    scales = torch.zeros(w.shape[0], num_groups(w.shape[1], group_size), dtype=torch.float16, device=m.device)
    for k in range(w.shape[0]):
        row_codes, row_scales = rtn_quantize(w[k : k + 1], bits[k : k + 1], group_size)
        codes[k], scales[k] = row_codes[0], row_scales[0]
        err = (w[k] - dequantize_rows(row_codes, row_scales, bits[k : k + 1], group_size)[0]) / hinv[k, k]
        w[k + 1 :] -= hinv[k, k + 1 :].unsqueeze(1) * err
    return codes, scales


