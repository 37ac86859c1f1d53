"""deltaserve.kernels: batched per-tenant delta kernels (Triton) with their PyTorch references."""
from .lowrank_delta import add_lowrank_delta
from .sign_delta import add_sign_delta
from .slot_metadata import SlotMetadata
from .slots import LowRankProjection, PackedTierSlots, SignProjection

__all__ = ["SlotMetadata", "PackedTierSlots", "LowRankProjection", "add_lowrank_delta", "SignProjection",
           "add_sign_delta"]
