"""Per-step slot metadata: the batch's rows grouped by tenant slot, built once and read by every delta kernel."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import triton

from .tables import upload_lists, upload_packed
from .tuning import DECODE_ROWS_POLICY, KERNELS, block_m_for, decode_rows

# Row-tile height of static metadata for any mix of its rows (covering graphs): decode segments are short.
STATIC_BLOCK_M = 16


class TileKinds(NamedTuple):
    """The variants of one kernel a step launches: tiles of at most decode_rows rows take its decode variant."""

    decode: bool      # some tile has at most decode_rows rows
    dot: bool         # some tile is taller: the tl.dot variant
    decode_rows: int  # tuning.decode_rows of the step's tile heights; the decode variant's DECODE_ROWS

    def covers(self, other: TileKinds) -> bool:
        """Whether launches of these kinds handle every tile of a step that needs `other`: the same kinds, or both
        variants (each tile then goes to exactly one of them, whatever decode_rows splits them at)."""
        return self == other or (self.decode and self.dot)


@dataclass(eq=False)
class SlotMetadata:
    """Rows of one batch grouped into segments, one per distinct slot present.

    Equivalent loop: for i in range(len(seg_slots_host)): rows sorted_rows[seg_starts[i] : seg_starts[i] + seg_lens[i]]
    all use slot seg_slots[i]. Rows of slot -1 (the base model) belong to no segment, so kernels never touch them.

    Static metadata (from_host with pad_to=P, for CUDA graphs) has P rows, the rows past the batch at slot -1;
    every device tensor's shape depends only on P and num_slots (with fit_tiles, also on the step's tile_shape),
    and so do the launch grids (see launch_tiles). copy_ moves another step's metadata into its tensors, which a
    captured graph keeps reading.
    """

    row_slots: torch.Tensor  # int32 [B], -1 = base
    num_slots: int  # S: slot indices lie in [-1, S)
    sorted_rows: torch.Tensor  # int32 [B_active] rows with a slot, grouped by slot (static: [P], padded with 0)
    seg_slots: torch.Tensor  # int32 [A] distinct slots, ascending (static: [P], padded with 0)
    seg_starts: torch.Tensor  # int32 [A] offset of each segment in sorted_rows (static: [P], padded with 0)
    seg_lens: torch.Tensor  # int32 [A] (static: [P], padded with 0)
    seg_lens_host: tuple[int, ...]  # seg_lens on the host: sizes the launch grids without another sync
    seg_slots_host: tuple[int, ...]  # seg_slots and seg_starts on the host, for the PyTorch references
    seg_starts_host: tuple[int, ...]
    row_slots_host: tuple[int, ...] = ()  # row_slots on the host (unpadded)
    _flat: torch.Tensor | None = field(default=None, repr=False)  # the one device buffer every tensor views
    _blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _kinds: dict[str, TileKinds] = field(default_factory=dict, repr=False)  # tile_kinds' answers, by kernel
    _split: dict = field(default_factory=dict, repr=False)  # split_long's answers, by min_rows
    _static_height: int = 0  # the height of static metadata's padded tiles; 0: dynamic (see static)
    _any_mix: bool = False   # static with tiles for any mix of its rows (from_host without fit_tiles)

    @classmethod
    def build(cls, row_slots: torch.Tensor, num_slots: int) -> SlotMetadata:
        """row_slots: int [B] slot per row (-1 = base). Raises ValueError for a slot outside [-1, num_slots).
        Reads row_slots on the host (one device sync); callers holding them on the host use from_host."""
        if row_slots.dim() != 1 or row_slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row_slots must be int32/int64 [B], got {row_slots.dtype} {list(row_slots.shape)}")
        return cls.from_host(row_slots.tolist(), num_slots, row_slots.device)

    @classmethod
    def from_host(cls, row_slots: list[int], num_slots: int, device: torch.device,
                  pad_to: int | None = None, fit_tiles: bool = False) -> SlotMetadata:
        """Same as build from a host list, without reading the device: grouped on the host, then every field and
        the row tiles at this batch's tile height (see blocks) go up in one non-blocking copy.

        pad_to=P makes static metadata for P rows (P >= len(row_slots)): row_slots padded with -1, the segment
        fields padded to P entries, and the row tiles padded with segment -1, on which a kernel program returns at
        once. The tiles are STATIC_BLOCK_M rows, static_tile_count(P, num_slots) of them: room for any mix of P
        rows (a covering graph's). fit_tiles: the tiles of this step instead, at its tile height (block_m_for)
        and padded to the next power of two of their count, so its launches take the configs of its own tile
        count and height (those kernel_bench times), and a tenant's 17-64 rows read its delta once, not once
        per 16 rows; copy_ then takes only steps of the same height and padded count (graph_key)."""
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if pad_to is not None and not max(len(row_slots), 1) <= pad_to:
            raise ValueError(f"pad_to must be >= 1 and >= the {len(row_slots)} rows, got {pad_to}")
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if not -1 <= slot < num_slots:
                raise ValueError(f"row {row} has slot index {slot}, outside [-1, {num_slots})")
            if slot >= 0:
                by_slot.setdefault(slot, []).append(row)
        seg_slots = sorted(by_slot)
        seg_lens = [len(by_slot[s]) for s in seg_slots]
        seg_starts = list(itertools.accumulate(seg_lens, initial=0))[:-1]
        sorted_rows = [r for s in seg_slots for r in by_slot[s]]
        any_mix = pad_to is not None and not fit_tiles
        block_m = STATIC_BLOCK_M if any_mix else block_m_for(max(seg_lens, default=0))
        tile_seg, tile_start = _tiles(seg_lens, block_m)
        parts = [list(row_slots), sorted_rows, seg_slots, seg_starts, seg_lens, tile_seg, tile_start]
        if pad_to is not None:
            n_tiles = static_tile_count(pad_to, num_slots) if any_mix else triton.next_power_of_2(max(len(tile_seg), 1))
            assert len(tile_seg) <= n_tiles, "the padded tile count is an upper bound"
            parts = [_pad(p, n, fill) for p, n, fill in zip(
                parts, [pad_to] * 5 + [n_tiles] * 2, [-1, 0, 0, 0, 0, -1, 0])]
        flat, t = upload_packed(parts, torch.device(device), torch.int32)
        meta = cls(t[0], num_slots, t[1], t[2], t[3], t[4], tuple(seg_lens), tuple(seg_slots), tuple(seg_starts),
                   row_slots_host=tuple(row_slots), _flat=flat, _static_height=block_m if pad_to is not None else 0,
                   _any_mix=any_mix)
        meta._blocks[block_m] = (t[5], t[6])
        return meta

    def copy_(self, other: SlotMetadata) -> None:
        """Make self describe other's step, in place: other's device tensors are copied into self's (one
        non-blocking device copy), so a CUDA graph captured with self replays on other's rows. Both must be
        static with the same padding and slot count; raises ValueError otherwise."""
        if not (self.static and other.static):
            raise ValueError("copy_ needs static metadata on both sides (from_host with pad_to)")
        if (self.num_rows, self.num_slots) != (other.num_rows, other.num_slots):
            raise ValueError(f"padded to {other.num_rows} rows of {other.num_slots} slots, "
                             f"self is {self.num_rows} rows of {self.num_slots} slots")
        if self.tile_shape != other.tile_shape:
            raise ValueError(f"other's tiles are {other.tile_shape} (rows, count), self's {self.tile_shape}: a graph "
                             f"captured with self would cut other's rows wrongly")
        if not all(mine.covers(theirs) for mine, theirs in zip(self.launch_kinds(), other.launch_kinds())):
            raise ValueError(f"other's rows need {other.launch_kinds()}, self's launch {self.launch_kinds()}: a "
                             f"graph captured with self would run the wrong kernels")
        self._flat.copy_(other._flat, non_blocking=True)
        self.seg_lens_host, self.seg_slots_host, self.seg_starts_host, self.row_slots_host = (
            other.seg_lens_host, other.seg_slots_host, other.seg_starts_host, other.row_slots_host)
        # Tiles of any other height were cut for the old rows (only the references ask for them).
        self._blocks = {self._static_height: self._blocks[self._static_height]}

    def launch_every_variant(self) -> None:
        """Make this static metadata launch both variants of every kernel, the decode one at its policy's most
        rows a tile, whatever its rows: a graph captured with it replays any step of its padding (copy_ takes
        them all), at the price of idle launches and of decode variants compiled for more rows than a step has."""
        if not self._any_mix:
            raise ValueError("launch_every_variant needs static metadata for any mix (from_host with pad_to, "
                             "without fit_tiles)")
        self._kinds = {k: TileKinds(True, True, DECODE_ROWS_POLICY[k].max_rows) for k in KERNELS}

    def split_long(self, min_rows: int) -> tuple[SlotMetadata | None, list[tuple[int, slice | torch.Tensor]]]:
        """(Metadata of the rows outside segments of min_rows or more rows, None if no row with a slot is left;
        each such segment as (slot, its rows: see _segment_rows)): what lowrank_dense takes and what is left to
        the kernels. Static metadata keeps every row (a captured graph's launches are fixed). Worked out once per
        min_rows: every linear of a step asks."""
        if self.static:
            return self, []
        if min_rows not in self._split:
            long = [(slot, start, n) for slot, start, n in zip(self.seg_slots_host, self.seg_starts_host,
                                                               self.seg_lens_host) if n >= min_rows]
            if not long:
                self._split[min_rows] = (self, [])
            else:
                taken = {slot for slot, _, _ in long}
                rest = ([-1 if s in taken else s for s in self.row_slots_host] if len(long) < len(self.seg_lens_host)
                        else None)
                self._split[min_rows] = (
                    None if rest is None else SlotMetadata.from_host(rest, self.num_slots, self.row_slots.device),
                    [(slot, self._segment_rows(slot, start, n)) for slot, start, n in long])
        return self._split[min_rows]

    def _segment_rows(self, slot: int, start: int, n: int) -> slice | torch.Tensor:
        """A segment's rows: a slice when they are consecutive (a prefill chunk's are: views, no gather), else
        their int64 indices on the device."""
        first = self.row_slots_host.index(slot)
        if self.row_slots_host[first:first + n] == (slot,) * n:
            return slice(first, first + n)
        return self.sorted_rows[start:start + n].long()

    @property
    def static(self) -> bool:
        """Padded for graph capture (from_host with pad_to): launches never read its host tuples (seg_*_host)."""
        return self._static_height > 0

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

    def tile_kinds(self, kernel: str) -> TileKinds:
        """Which of `kernel`'s decode and tl.dot variants this step's row tiles (see launch_tiles) take. Static
        metadata takes in only steps whose kinds its own cover (copy_ checks), so a graph captured with it holds
        every launch its replays need; with exactly their kinds, none they do not (an idle launch of the other
        kind costs a few microseconds, 400 times a 7B step), unless it launches every variant
        (launch_every_variant)."""
        if kernel not in self._kinds:  # asked by every delta call of a step: worked out once
            block_m = self.tile_height
            heights = [min(n - m0, block_m) for n in self.seg_lens_host for m0 in range(0, n, block_m)]
            rows = decode_rows(heights, kernel)
            self._kinds[kernel] = TileKinds(any(h <= rows for h in heights), any(h > rows for h in heights), rows)
        return self._kinds[kernel]

    def launch_kinds(self) -> tuple[TileKinds, ...]:
        """tile_kinds of every kernel (KERNELS order): what a captured graph of this step launches."""
        return tuple(self.tile_kinds(k) for k in KERNELS)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(rows a tile, tiles) of static metadata's launches: its grids and tile tensors ((0, 0) if dynamic)."""
        if not self.static:
            return 0, 0
        return self._static_height, self._blocks[self._static_height][0].shape[0]

    def graph_key(self) -> tuple:
        """What a CUDA graph captured with this static metadata is for: its tiles, whether they fit any mix of its
        rows (a covering graph's), and its launches (copy_ takes steps of the same tiles whose launches these
        cover)."""
        return self.tile_shape, self._any_mix, self.launch_kinds()

    def launch_tiles(self) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """What a delta kernel launch iterates over: (tile height, tile segments, tile starts; see blocks), or
        None when no row has a slot. Static metadata always gives its fixed padded tiles, never None (tile_kinds
        then says whether a kernel launches at all)."""
        if self.static:
            return (self.tile_height, *self._blocks[self.tile_height])
        if not self.seg_lens_host:
            return None
        return (self.tile_height, *self.blocks(self.tile_height))

    @property
    def tile_height(self) -> int:
        """Rows of a launch's row tiles: static metadata's own (from_host), else block_m_for this batch."""
        return self._static_height if self.static else block_m_for(self.max_seg_len)


def static_tile_count(num_rows: int, num_slots: int) -> int:
    """Most row tiles of STATIC_BLOCK_M rows that num_rows rows over num_slots slots can need: A segments of
    n_i rows take sum(ceil(n_i / M)) <= A + (rows - A) // M tiles, largest at the most segments A."""
    a = min(num_rows, num_slots)
    return max(a + (num_rows - a) // STATIC_BLOCK_M, 1)  # never an empty grid


def _pad(values: list[int], n: int, fill: int) -> list[int]:
    return values + [fill] * (n - len(values))


def _tiles(seg_lens: Sequence[int], block_m: int) -> tuple[list[int], list[int]]:
    """Row tiles of at most block_m rows within one segment: (segment of each tile, its start in sorted_rows)."""
    seg, start, offset = [], [], 0
    for i, n in enumerate(seg_lens):
        for m0 in range(0, n, block_m):
            seg.append(i)
            start.append(offset + m0)
        offset += n
    return seg, start
