"""Compression methods by name, all sized by one budget in bits per delta parameter."""

import math
from dataclasses import dataclass, field

import torch

from .bitdelta import compress_bitdelta
from .allocation import AdaptivePlan, TierPlan
from .deltacome import DEFAULT_PLAN, compress_deltacome
from .format import DenseDelta, WeightDelta
from .lowrank_svd import compress_svd
from .packing import check_group_size

METHODS = ("deltacome", "bitdelta", "svd", "dense")
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class MethodOptions:
    method: str = "deltacome"
    bits_per_param: float = 1.0  # budget per 2-D weight, every stored byte counted; FP16 delta = 16
    group_size: int = 128
    plan: TierPlan | AdaptivePlan = field(default=DEFAULT_PLAN)  # deltacome only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if not (isinstance(self.bits_per_param, (int, float)) and math.isfinite(self.bits_per_param)
                and 0 < self.bits_per_param <= 16):
            raise ValueError(f"--bits-per-param must be in (0, 16], got {self.bits_per_param!r}")
        try:
            check_group_size(self.group_size)
        except ValueError as exc:
            raise ValueError(f"--group-size: {exc}") from None

    def budget_bytes(self, shape: tuple[int, int]) -> int:
        return int(self.bits_per_param * shape[0] * shape[1] / 8)

    def config(self) -> dict:
        """What the metadata records about how the weights were made."""
        if self.method == "deltacome":
            return {"tiers": str(self.plan)}
        return {}


def dense_fp16(delta: torch.Tensor) -> DenseDelta:
    if delta.abs().max() > FP16_MAX:
        raise ValueError("delta has values beyond the FP16 range")
    return DenseDelta(delta.half().cpu())


def compress_weight(delta: torch.Tensor, options: MethodOptions, hessian: torch.Tensor | None) -> WeightDelta | None:
    """One weight's delta (fp32) -> its stored form; None when the delta is exactly zero (left out)."""
    if not torch.count_nonzero(delta):
        return None
    if delta.dim() == 1 or options.method == "dense":
        return dense_fp16(delta)
    if delta.dim() != 2:
        raise ValueError(f"{delta.dim()}-D weights are not supported")
    if options.method == "bitdelta":
        return compress_bitdelta(delta, options.bits_per_param)
    if options.method == "svd":
        return compress_svd(delta, options.budget_bytes(delta.shape))
    return compress_deltacome(delta, options.budget_bytes(delta.shape), options.group_size, options.plan, hessian)
