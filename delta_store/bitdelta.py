"""The `bitdelta` method (BitDelta, arXiv 2402.10193): the sign of every delta entry and one scale per
matrix, the mean absolute delta (the scale minimising the Frobenius error for fixed signs).
The paper's second step, distilling the scales against the fine-tune's logits, is not done here."""

import torch

from .format import SignDelta
from .packing import pack_bitplanes


def compress_bitdelta(delta: torch.Tensor, bits_per_param: float) -> SignDelta:
    # One sign bit per parameter is the method's fixed size; a larger budget buys nothing here.
    if bits_per_param < 1.0:
        raise ValueError(f"bitdelta stores 1 sign bit per parameter; --bits-per-param {bits_per_param} is below 1")
    signs = pack_bitplanes((delta > 0).to(torch.uint8), 1)[0]
    scale = delta.float().abs().mean().reshape(1)
    return SignDelta(signs.cpu(), scale.cpu(), tuple(delta.shape))
