"""Random but well-formed slot buffers for tests and benchmarks: realistic sizes and value ranges.

Codes are uniform over each slot's bit-width, words past d are 0 as the packing layout requires, scales
are positive fp16 of the size a unit-norm singular vector gets, and nothing is zero.
"""
from __future__ import annotations

import torch

from deltaserve.delta_store.packing import num_groups, num_words

from .slots import PackedTierSlots, SignProjection


def _planes(S: int, bits_cap: int, rows: int, d: int, g: torch.Generator) -> torch.Tensor:
    """int32 [S, bits_cap, rows, ceil(d/32)] random bits on g's device, zero past element d."""
    words = torch.randint(0, 2**32, (S, bits_cap, rows, num_words(d)), generator=g, device=g.device,
                          dtype=torch.int64)
    if d % 32:
        words[..., -1] &= (1 << (d % 32)) - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def random_tier(ranks: list[int], bits: list[int], rank_cap: int, bits_cap: int, d_in: int, d_out: int,
                group_size: int, g: torch.Generator) -> PackedTierSlots:
    """One tier for len(ranks) slots on g's device; slot k uses ranks[k] ranks at bits[k] bits."""
    S, device = len(ranks), g.device

    def scales(d: int) -> torch.Tensor:
        shape = (S, rank_cap, num_groups(d, group_size))
        return (torch.rand(shape, generator=g, device=device) * 0.05 + 0.01).half()

    return PackedTierSlots(
        v_planes=_planes(S, bits_cap, rank_cap, d_in, g), v_scales=scales(d_in),
        u_planes=_planes(S, bits_cap, rank_cap, d_out, g), u_scales=scales(d_out),
        s=torch.rand(S, rank_cap, generator=g, device=device) + 0.5,
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        bits=torch.tensor(bits, dtype=torch.int32, device=device),
    )


def random_signs(S: int, d_in: int, d_out: int, out_offset: int, g: torch.Generator) -> SignProjection:
    """BitDelta signs of a d_out x d_in weight for S slots on g's device."""
    return SignProjection(out_offset=out_offset, signs=_planes(S, 1, d_out, d_in, g)[:, 0].contiguous(),
                          scales=torch.rand(S, generator=g, device=g.device) * 0.01 + 0.001)
