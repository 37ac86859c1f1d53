"""Random but well-formed slot buffers for tests and benchmarks: realistic sizes and value ranges.

Codes are uniform over each slot's bit-width, words past d are 0 as the packing layout requires, scales
are positive fp16 of the size a unit-norm singular vector gets, and nothing is zero.
"""
from __future__ import annotations

import torch

from deltaserve.delta_store.packing import num_groups, num_words

from .slots import PackedTierSlots, SignProjection


def _planes(S: int, bits_cap: int, rows: int, d: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """int32 [S, bits_cap, rows, ceil(d/32)] random bits, zero past element d."""
    words = num_words(d)
    bits = torch.randint(0, 2, (S, bits_cap, rows, words * 32), generator=g, dtype=torch.int64)
    bits[..., d:] = 0
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32)
    planes = (bits.view(S, bits_cap, rows, words, 32) * weights).sum(-1)
    return torch.where(planes >= 2**31, planes - 2**32, planes).to(torch.int32).to(device)


def random_tier(ranks: list[int], bits: list[int], rank_cap: int, bits_cap: int, d_in: int, d_out: int,
                group_size: int, g: torch.Generator, device: torch.device | str = "cpu") -> PackedTierSlots:
    """One tier for len(ranks) slots; slot k uses ranks[k] ranks at bits[k] bits."""
    S = len(ranks)
    device = torch.device(device)

    def scales(d: int) -> torch.Tensor:
        return (torch.rand(S, rank_cap, num_groups(d, group_size), generator=g) * 0.05 + 0.01).half().to(device)

    return PackedTierSlots(
        v_planes=_planes(S, bits_cap, rank_cap, d_in, g, device), v_scales=scales(d_in),
        u_planes=_planes(S, bits_cap, rank_cap, d_out, g, device), u_scales=scales(d_out),
        s=(torch.rand(S, rank_cap, generator=g) + 0.5).to(device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        bits=torch.tensor(bits, dtype=torch.int32, device=device),
    )


def random_signs(S: int, d_in: int, d_out: int, out_offset: int, g: torch.Generator,
                 device: torch.device | str = "cpu") -> SignProjection:
    return SignProjection(out_offset=out_offset, signs=_planes(S, 1, d_out, d_in, g, torch.device(device))[:, 0].contiguous(),
                          scales=(torch.rand(S, generator=g) * 0.01 + 0.001).to(device))
