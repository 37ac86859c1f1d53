"""deltaserve.kernels: batched per-tenant delta kernels (Triton) with their PyTorch references."""
from .lowrank_delta import add_lowrank_delta
from .lowrank_plan import LowRankPlan, lowrank_plan_for
from .paged_attention import paged_decode_attention
from .sign_delta import SignPlan, add_sign_delta, sign_plan_for
from .slot_metadata import SlotMetadata
from .slots import LowRankProjection, PackedTierSlots, SignProjection

__all__ = ["SlotMetadata", "PackedTierSlots", "LowRankProjection", "LowRankPlan", "lowrank_plan_for",
           "add_lowrank_delta", "SignProjection", "SignPlan", "sign_plan_for", "add_sign_delta",
           "paged_decode_attention"]
