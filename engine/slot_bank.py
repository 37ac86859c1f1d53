"""The engine's delta slots: which weights each resident tenant changes, capacity checks, per-step row metadata."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltaserve.delta_store.format import DeltaFile, LowRankDelta, QuantTier, weight_bytes
from deltaserve.engine.delta_slots import WeightSlots
from deltaserve.kernels import SlotMetadata

# Per-matrix scalars (a BitDelta scale, say) are not charged against the bits-per-parameter capacity.
_PER_MATRIX_ALLOWANCE = 8


@dataclass(slots=True)
class DeltaRows:
    """Which slot each row of one forward pass uses, prepared once per step and read by every layer."""

    row_slots: torch.Tensor                    # int32 [B] slot of each row, -1 = base
    gather_slots: torch.Tensor                 # int32 [B] row_slots with base rows at slot 0, for gathers by row
    base_mask: torch.Tensor                    # bool [B, 1] rows of the base model, whose gathered delta is zeroed
    groups: list[tuple[int, torch.Tensor]]     # (slot, int32 row indices) for each distinct slot >= 0
    packed: SlotMetadata | None                # rows of slots holding quantized low-rank deltas, else -1
    sign: SlotMetadata | None                  # rows of slots holding BitDelta deltas, else -1


class SlotBank:
    def __init__(self, shapes: dict[str, tuple[int, ...]], num_slots: int, bits_per_param: float,
                 device: torch.device, dtype: torch.dtype):
        self.num_slots = num_slots
        self.device = device
        self.weights = {name: WeightSlots(name, shape, num_slots, device, dtype) for name, shape in shapes.items()}
        matrices = [math.prod(s) for s in shapes.values() if len(s) == 2]
        # Capacity of one slot: bits_per_param over every weight matrix, plus the per-matrix allowance.
        # 1-D deltas (norms, biases) are a few KB and are not counted.
        self.capacity_bytes = int(bits_per_param * sum(matrices) / 8) + _PER_MATRIX_ALLOWANCE * len(matrices)
        self.group_size = 0
        self.generation = [0] * num_slots       # bumped on every load/clear: K/V cached under a slot expire
        self._kind_slots: dict[str, set[int]] = {"packed": set(), "sign": set()}

    def slot_bytes(self, delta: DeltaFile) -> int:
        return sum(weight_bytes(d) for d in delta.weights.values())

    def check(self, slot: int, delta: DeltaFile) -> None:
        """Raise ValueError (clear, one line) if `delta` cannot go into `slot`; touches no buffer."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.num_slots})")
        for name, d in delta.weights.items():
            if name not in self.weights:
                raise ValueError(f"delta holds {name!r}, which the backbone does not have")
            if tuple(d.shape) != self.weights[name].shape:
                raise ValueError(f"delta for {name} has shape {list(d.shape)}, the backbone "
                                 f"{list(self.weights[name].shape)}")
        counted = sum(weight_bytes(d) for d in delta.weights.values() if len(d.shape) == 2)
        if counted > self.capacity_bytes:
            raise ValueError(f"delta needs {counted} bytes of weight-matrix deltas, a slot holds "
                             f"{self.capacity_bytes} (slot_bits_per_param too small for this delta)")
        packed = any(isinstance(t, QuantTier) for d in delta.weights.values() if isinstance(d, LowRankDelta)
                     for t in d.tiers)
        if packed and self.group_size and delta.group_size != self.group_size:
            raise ValueError(f"delta group_size {delta.group_size} differs from the resident deltas' "
                             f"{self.group_size}; recompress with group_size={self.group_size}")

    def load(self, slot: int, delta: DeltaFile) -> None:
        self.check(slot, delta)
        self.clear(slot)
        for name, d in delta.weights.items():
            self.weights[name].write(slot, d, delta.group_size)
        kinds = set().union(*(self.weights[name].kinds[slot] for name in delta.weights))
        for kind, slots in self._kind_slots.items():
            if kind in kinds:
                slots.add(slot)
        if "packed" in kinds:
            self.group_size = delta.group_size

    def clear(self, slot: int) -> None:
        self.generation[slot] += 1
        for w in self.weights.values():
            w.clear(slot)
        for slots in self._kind_slots.values():
            slots.discard(slot)
        if not self._kind_slots["packed"]:
            self.group_size = 0

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.weights.values())

    def rows(self, row_slots: list[int]) -> DeltaRows | None:
        """Metadata for rows with these slots (host list), or None when every row is the base model. Built on the
        host and uploaded without reading the device; when every tenant row's slot holds packed (or sign) deltas,
        that kernel metadata is the all-slots one, so a step usually costs one upload here."""
        if all(slot < 0 for slot in row_slots):
            return None
        every = SlotMetadata.from_host(row_slots, self.num_slots, self.device)
        groups = [(slot, every.sorted_rows[start : start + n])
                  for slot, start, n in zip(every.seg_slots_host, every.seg_starts_host, every.seg_lens_host)]
        return DeltaRows(every.row_slots, every.row_slots.clamp(min=0), (every.row_slots < 0)[:, None], groups,
                         self._metadata(row_slots, "packed", every),
                         self._metadata(row_slots, "sign", every))

    def _metadata(self, row_slots: list[int], kind: str, every: SlotMetadata) -> SlotMetadata | None:
        holders = self._kind_slots[kind]
        if not holders.intersection(every.seg_slots_host):
            return None
        if holders.issuperset(every.seg_slots_host):
            return every
        masked = [s if s in holders else -1 for s in row_slots]
        return SlotMetadata.from_host(masked, self.num_slots, self.device)
