"""How a deltacome matrix spends its byte budget: which singular directions get how many bits.

Two strategies, compared at equal bytes by bench/tier_allocation.py:
- `TierPlan` (fixed shares, Delta-CoMe style): tier t gets a fixed share of the budget at a fixed width,
  e.g. 8:0.02,3:0.1,2:0.88; bytes a tier cannot spend on a whole rank carry over to the next tier.
- `AdaptivePlan` (per matrix, from its spectrum, in the spirit of PrinMix arXiv 2506.11087): each rank k
  picks its width b (0 = dropped) to minimise the expected error s_k^2 * e(b) under the budget, where e(b)
  is the measured relative error of a rank-1 term whose u and v are group-quantized at b bits. Solved
  with a Lagrange multiplier: each rank minimises s_k^2 e(b) + lam * bytes(b); lam is bisected until the
  bytes fit. Widths come out non-increasing in k, so ranks of one width form one contiguous tier.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch

from .packing import MAX_BITS, num_groups, num_words
from .quantize import dequantize_rows, rtn_quantize

BISECTION_STEPS = 60


def rank_bytes(bits: int, d_out: int, d_in: int, group_size: int) -> int:
    """Stored bytes of one rank at `bits`: planes of u and v, their fp16 group scales, one fp32 s."""
    planes = 4 * bits * (num_words(d_out) + num_words(d_in))
    return planes + 2 * (num_groups(d_out, group_size) + num_groups(d_in, group_size)) + 4


@dataclass(frozen=True)
class TierPlan:
    """Fixed tiers: bit widths (highest first) and the share of each matrix's byte budget each gets."""

    bits: tuple[int, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.bits or len(self.bits) != len(self.shares):
            raise ValueError("--tiers: bits and shares must be non-empty and of equal length")
        if any(not 1 <= b <= MAX_BITS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise ValueError(f"--tiers: bits {self.bits} must be in 1..{MAX_BITS}, highest first")
        if any(s <= 0 for s in self.shares) or abs(sum(self.shares) - 1) > 1e-6:
            raise ValueError(f"--tiers: shares {self.shares} must be positive and sum to 1")

    def __str__(self) -> str:
        return ",".join(f"{b}:{s:g}" for b, s in zip(self.bits, self.shares))

    def max_rank(self, d_out: int, d_in: int, budget_bytes: int, group_size: int) -> int:
        return sum(rank for _, rank in self.ranks(None, d_out, d_in, budget_bytes, group_size))

    def ranks(self, s: torch.Tensor | None, d_out: int, d_in: int, budget_bytes: int, group_size: int) -> list[tuple[int, int]]:
        """(bits, rank) per tier; the spectrum s is not needed by fixed shares."""
        tiers, carry, left = [], 0.0, min(d_out, d_in)
        for bits, share in zip(self.bits, self.shares):
            money = share * budget_bytes + carry
            cost = rank_bytes(bits, d_out, d_in, group_size)
            rank = min(int(money // cost), left)
            carry, left = money - rank * cost, left - rank
            if rank:
                tiers.append((bits, rank))
        return tiers


@lru_cache(maxsize=None)
def rank1_error(bits: int, group_size: int) -> float:
    """Measured relative squared error of a rank-1 term u v^T with u and v quantized at `bits`.

    Singular vectors of a delta have near-Gaussian entries, so Gaussian vectors stand in for them; the
    error of the product is about the sum of the two vectors' relative errors.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8 * group_size, generator=gen)
    width = torch.full((64,), bits)
    codes, scales = rtn_quantize(x, width, group_size)
    rel = (dequantize_rows(codes, scales, width, group_size) - x).square().sum() / x.square().sum()
    return 2 * float(rel)


@dataclass(frozen=True)
class AdaptivePlan:
    """Per-matrix widths from the spectrum; `choices` are the widths a rank may take (besides dropped)."""

    choices: tuple[int, ...] = (8, 4, 3, 2)

    def __post_init__(self) -> None:
        if not self.choices or any(not 1 <= b <= MAX_BITS for b in self.choices):
            raise ValueError(f"adaptive tiers: widths {self.choices} must be in 1..{MAX_BITS}")

    def __str__(self) -> str:
        return "auto:" + "/".join(str(b) for b in sorted(self.choices, reverse=True))

    def max_rank(self, d_out: int, d_in: int, budget_bytes: int, group_size: int) -> int:
        return min(d_out, d_in, budget_bytes // rank_bytes(min(self.choices), d_out, d_in, group_size))

    def ranks(self, s: torch.Tensor, d_out: int, d_in: int, budget_bytes: int, group_size: int) -> list[tuple[int, int]]:
        widths = sorted(self.choices, reverse=True)
        cost = torch.tensor([0.0] + [float(rank_bytes(b, d_out, d_in, group_size)) for b in widths], dtype=torch.float64)
        error = torch.tensor([1.0] + [rank1_error(b, group_size) for b in widths], dtype=torch.float64)
        energy = s.double().cpu().square().unsqueeze(1)  # [K, 1]

        def choose(lam: float) -> torch.Tensor:  # option index per rank: 0 = dropped, i = widths[i - 1]
            return (energy * error + lam * cost).argmin(dim=1)

        # Bisect lam in log space between "everything at the top width" and "everything dropped".
        lo, hi = 1e-30, float(energy.max()) + 1.0
        for _ in range(BISECTION_STEPS):
            mid = (lo * hi) ** 0.5
            if float(cost[choose(mid)].sum()) > budget_bytes:
                lo = mid
            else:
                hi = mid
        picked = choose(hi)
        tiers: list[tuple[int, int]] = []
        for option in picked.tolist():
            if option == 0:
                break  # widths never increase along the spectrum: the rest is dropped too
            bits = widths[option - 1]
            if tiers and tiers[-1][0] == bits:
                tiers[-1] = (bits, tiers[-1][1] + 1)
            else:
                tiers.append((bits, 1))
        return tiers


def parse_plan(text: str) -> TierPlan | AdaptivePlan:
    """'auto' | 'auto:8/4/3/2' | '8:0.02,3:0.1,2:0.88' (bits:share pairs)."""
    try:
        if text == "auto":
            return AdaptivePlan()
        if text.startswith("auto:"):
            return AdaptivePlan(tuple(int(b) for b in text[5:].split("/")))
        pairs = [item.split(":") for item in text.split(",")]
        return TierPlan(tuple(int(b) for b, _ in pairs), tuple(float(s) for _, s in pairs))
    except ValueError as exc:
        raise ValueError(f"--tiers {text!r}: expected 'auto', 'auto:8/4/3/2' or bits:share pairs like "
                         f"8:0.02,3:0.1,2:0.88 ({exc})") from None
