"""Per-step slot metadata: the batch's rows grouped by tenant slot, built once and read by every delta kernel."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    _blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, row_slots: torch.Tensor, num_slots: int) -> SlotMetadata:
        """row_slots: int [B] slot per row (-1 = base). Raises ValueError for a slot outside [-1, num_slots)."""
        if row_slots.dim() != 1 or row_slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row_slots must be int32/int64 [B], got {row_slots.dtype} {list(row_slots.shape)}")
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        slots = row_slots.to(torch.int32)
        bad = (slots < -1) | (slots >= num_slots)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"row {row} has slot index {int(slots[row])}, outside [-1, {num_slots})")
        active = (slots >= 0).nonzero().squeeze(1)
        order = torch.argsort(slots[active], stable=True)
        sorted_rows = active[order].to(torch.int32)
        seg_slots, seg_lens = torch.unique_consecutive(slots[sorted_rows], return_counts=True)
        seg_lens = seg_lens.to(torch.int32)
        seg_starts = (torch.cumsum(seg_lens, 0, dtype=torch.int32) - seg_lens).to(torch.int32)
        return cls(slots, num_slots, sorted_rows, seg_slots.to(torch.int32), seg_starts, seg_lens,
                   tuple(seg_lens.tolist()))

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
            seg, start, offset = [], [], 0
            for i, n in enumerate(self.seg_lens_host):
                for m0 in range(0, n, block_m):
                    seg.append(i)
                    start.append(offset + m0)
                offset += n
            device = self.row_slots.device
            self._blocks[block_m] = (torch.tensor(seg, dtype=torch.int32, device=device),
                                     torch.tensor(start, dtype=torch.int32, device=device))
        return self._blocks[block_m]
