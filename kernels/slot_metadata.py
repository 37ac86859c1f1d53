"""Per-step slot metadata: the batch's rows grouped by tenant slot, built once and read by every delta kernel."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .tables import upload_lists
from .tuning import block_m_for


@dataclass(frozen=True)
class SlotMetadata:
    """Rows of one batch grouped into segments, one per distinct slot present.

    Equivalent loop: for i in range(len(seg_slots)): rows sorted_rows[seg_starts[i] : seg_starts[i] + seg_lens[i]]
    all use slot seg_slots[i]. Rows of slot -1 (the base model) belong to no segment, so kernels never touch them.
    """

    row_slots: torch.Tensor  # int32 [B], -1 = base
    num_slots: int  # S: slot indices lie in [-1, S)
    sorted_rows: torch.Tensor  # int32 [B_active] rows with a slot, grouped by slot
    seg_slots: torch.Tensor  # int32 [A] distinct slots, ascending
    seg_starts: torch.Tensor  # int32 [A] offset of each segment in sorted_rows
    seg_lens: torch.Tensor  # int32 [A]
    seg_lens_host: tuple[int, ...]  # seg_lens on the host: sizes the launch grids without another sync
    seg_slots_host: tuple[int, ...]  # seg_slots and seg_starts on the host, for the PyTorch references
    seg_starts_host: tuple[int, ...]
    _blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, row_slots: torch.Tensor, num_slots: int) -> SlotMetadata:
        """row_slots: int [B] slot per row (-1 = base). Raises ValueError for a slot outside [-1, num_slots).
        Reads row_slots on the host (one device sync); callers holding them on the host use from_host."""
        if row_slots.dim() != 1 or row_slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row_slots must be int32/int64 [B], got {row_slots.dtype} {list(row_slots.shape)}")
        return cls.from_host(row_slots.tolist(), num_slots, row_slots.device)

    @classmethod
    def from_host(cls, row_slots: list[int], num_slots: int, device: torch.device) -> SlotMetadata:
        """Same as build from a host list, without reading the device: grouped on the host, then every field and
        the row tiles at this batch's tile height (see blocks) go up in one non-blocking copy."""
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if not -1 <= slot < num_slots:
                raise ValueError(f"row {row} has slot index {slot}, outside [-1, {num_slots})")
            if slot >= 0:
                by_slot.setdefault(slot, []).append(row)
        seg_slots = sorted(by_slot)
        seg_lens = [len(by_slot[s]) for s in seg_slots]
        seg_starts = list(itertools.accumulate(seg_lens, initial=0))[:-1]
        block_m = block_m_for(max(seg_lens, default=0))
        tiles = _tiles(seg_lens, block_m)
        t = upload_lists([row_slots, [r for s in seg_slots for r in by_slot[s]], seg_slots, seg_starts, seg_lens,
                         *tiles], torch.device(device), torch.int32)
        meta = cls(t[0], num_slots, t[1], t[2], t[3], t[4], tuple(seg_lens), tuple(seg_slots), tuple(seg_starts))
        meta._blocks[block_m] = (t[5], t[6])
        return meta

    @property
    def num_rows(self) -> int:
        return self.row_slots.shape[0]

    @property
    def max_seg_len(self) -> int:
        return max(self.seg_lens_host, default=0)

    def blocks(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles of at most block_m rows, none spanning two segments: (segment int32 [NB], start in sorted_rows
        int32 [NB]). Cached, so all kernels of a step share one upload per tile height."""
        if block_m not in self._blocks:
            seg, start = upload_lists(_tiles(self.seg_lens_host, block_m), self.row_slots.device, torch.int32)
            self._blocks[block_m] = (seg, start)
        return self._blocks[block_m]


def _tiles(seg_lens: Sequence[int], block_m: int) -> tuple[list[int], list[int]]:
    """Row tiles of at most block_m rows within one segment: (segment of each tile, its start in sorted_rows)."""
    seg, start, offset = [], [], 0
    for i, n in enumerate(seg_lens):
        for m0 in range(0, n, block_m):
            seg.append(i)
            start.append(offset + m0)
        offset += n
    return seg, start
