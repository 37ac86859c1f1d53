"""The engine's delta slots: which weights each resident tenant changes, capacity checks, per-step row metadata."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltaserve.delta_store.format import DeltaFile, LowRankDelta, QuantTier, weight_bytes
from deltaserve.engine.delta_slots import WeightSlots
from deltaserve.kernels import SlotMetadata
from deltaserve.kernels.tables import upload_lists

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

    def graph_key(self) -> tuple:
        """The row tiles and delta kernel launches of a step of these rows (SlotMetadata.graph_key of each kind's
        rows): part of a captured decode graph's key, as a graph holds only its capturing step's launches."""
        return tuple(None if m is None else m.graph_key() for m in (self.packed, self.sign))

    def launch_every_variant(self) -> DeltaRows:
        """These (static) rows with every kind's metadata launching every kernel variant
        (SlotMetadata.launch_every_variant): a graph captured with them replays any step of their padding."""
        for meta in (self.packed, self.sign):
            if meta is not None:
                meta.launch_every_variant()
        return self

    def copy_(self, other: DeltaRows) -> None:
        """Take `other`'s rows into these tensors in place (both from SlotBank.static_rows at one pad_to)."""
        for name in ("row_slots", "gather_slots", "base_mask"):
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)
        for mine, theirs in ((self.packed, other.packed), (self.sign, other.sign)):
            if (mine is None) != (theirs is None):
                raise ValueError("static rows of different slot-bank layouts")
            if mine is not None:
                mine.copy_(theirs)


@dataclass
class LoadPlan:
    """SlotBank.plan_load's result: the copies that put `delta` into `slot`, and the buffers they write into."""

    slot: int
    delta: DeltaFile
    pairs: list[tuple[torch.Tensor, torch.Tensor]]     # (destination view, source on the host or the device)
    buffers: list[tuple]                               # WeightSlots.buffers() of every weight when planned
    written: bool = False                              # write_plan done: commit_plan may make it the slot's delta


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
        # Slots by how their weight-matrix deltas are applied: the two kernels, or torch per slot ("torch": the
        # svd and dense methods, which a captured decode graph cannot take).
        self._kind_slots: dict[str, set[int]] = {"packed": set(), "sign": set(), "torch": set()}
        self._layout: tuple | None = None       # cache of layout_key(), dropped on every load/clear

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
        self._note_kinds(slot, delta)

    def plan_load(self, slot: int, delta: DeltaFile) -> LoadPlan | None:
        """A load of `delta` (its tensors on the host, page-locked for asynchronous copies, or on the device) into
        `slot` as one batched copy, or None when it needs load() (a buffer must grow, or an svd delta). Planning
        takes torch calls (thousands the first time a slot sees a tier shape, whose views are then cached), so a
        caller plans and writes off the step thread, and only commit_plan runs on it. `delta` must have passed
        check(slot, delta) (LLMEngine.plan_load runs it); commit_plan checks again, as resident deltas may have
        changed since."""
        pairs, buffers = [], []
        for name, w in self.weights.items():
            # Buffers noted before their views are taken: one grown meanwhile (by a load on the step thread)
            # fails commit_plan's check instead of the copies counting in a buffer no longer in use.
            buffers.append(w.buffers())
            weight_pairs = w.copy_plan(slot, delta.weights.get(name), delta.group_size)
            if weight_pairs is None:
                return None
            pairs += weight_pairs
        return LoadPlan(slot, delta, pairs, buffers)

    def write_plan(self, plan: LoadPlan) -> None:
        """A plan's copies, as one torch call (the host-to-device ones asynchronous on the current stream). Safe
        from any thread while steps run, as they touch only plan.slot's part of the buffers and no step reads a
        slot that is being loaded (AsyncEngine.load_delta's contract); the slot's host state, which says what
        it holds, changes only in commit_plan."""
        torch._foreach_copy_([dst for dst, _ in plan.pairs], [src for _, src in plan.pairs], non_blocking=True)
        plan.written = True

    def commit_plan(self, plan: LoadPlan) -> bool:
        """Make a written plan the slot's delta (host state only; on the step thread, after the copies finished).
        False, changing nothing, when a buffer was replaced since the plan was made: load() then."""
        if not plan.written:
            raise RuntimeError(f"commit of a load plan for slot {plan.slot} whose copies were never written")
        if not all(w.holds(planned) for w, planned in zip(self.weights.values(), plan.buffers)):
            return False
        try:
            self.check(plan.slot, plan.delta)
        except ValueError:
            self.clear(plan.slot)   # the copies are in the slot's buffers: leave it empty, not half another's
            raise
        self._forget(plan.slot)
        for name, w in self.weights.items():
            w.commit_plan(plan.slot, plan.delta.weights.get(name), plan.delta.group_size)
        self._note_kinds(plan.slot, plan.delta)
        return True

    def clear(self, slot: int) -> None:
        self._forget(slot)
        for w in self.weights.values():
            w.clear(slot)

    def _forget(self, slot: int) -> None:
        """Host state of a slot being emptied: its K/V expires, graphs re-check the layout, kinds forget it."""
        self.generation[slot] += 1
        self._layout = None
        for slots in self._kind_slots.values():
            slots.discard(slot)
        if not self._kind_slots["packed"]:
            self.group_size = 0

    def _note_kinds(self, slot: int, delta: DeltaFile) -> None:
        kinds = set().union(*(self.weights[name].kinds[slot] for name in delta.weights))
        for kind in ("packed", "sign"):
            if kind in kinds:
                self._kind_slots[kind].add(slot)
        if any(slot in self.weights[name].torch_slots and len(d.shape) == 2 for name, d in delta.weights.items()):
            self._kind_slots["torch"].add(slot)
        if "packed" in kinds:
            self.group_size = delta.group_size

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

    def torch_applied(self, slot: int) -> bool:
        """Whether some weight matrix of `slot` takes the per-slot torch path (svd/dense methods)."""
        return slot in self._kind_slots["torch"]

    def layout_key(self) -> tuple:
        """Identity of everything a captured decode graph bakes in: the address of every slot buffer, and which
        weights apply 1-D deltas at all. Equal keys: a graph captured under one replays correctly under the
        other, whatever tenants were loaded in between (their bytes live in the same buffers)."""
        if self._layout is None:
            key = []
            for w in self.weights.values():
                tensors = [w.sign_bits, w.sign_scales, w.dense, w.lr_u, w.lr_v, w.lr_s]
                tensors += [getattr(t, f) for t in w.packed for f in ("v_planes", "v_scales", "u_planes",
                                                                      "u_scales", "s", "ranks", "bits")]
                key.append((tuple(t.data_ptr() if t is not None else 0 for t in tensors), bool(w.torch_slots)))
            self._layout = (tuple(key), bool(self._kind_slots["packed"]), bool(self._kind_slots["sign"]))
        return self._layout

    def static_rows(self, row_slots: list[int], pad_to: int, fit_tiles: bool = False) -> DeltaRows:
        """DeltaRows of a captured decode step: row_slots padded with base rows to pad_to, every tensor's shape
        fixed by pad_to (and with fit_tiles by this step's row tiles: SlotMetadata.from_host), kernel metadata
        present whenever some resident slot uses that kernel (not only this step's), and no per-slot groups
        (graph steps hold no torch-applied slot: see torch_applied)."""
        (row,) = upload_lists([row_slots + [-1] * (pad_to - len(row_slots))], self.device, torch.int32)

        def kernel_rows(kind: str) -> SlotMetadata | None:
            holders = self._kind_slots[kind]
            if not holders:
                return None
            return SlotMetadata.from_host([s if s in holders else -1 for s in row_slots], self.num_slots,
                                          self.device, pad_to=pad_to, fit_tiles=fit_tiles)
        return DeltaRows(row, row.clamp(min=0), (row < 0)[:, None], [], kernel_rows("packed"), kernel_rows("sign"))

    def _metadata(self, row_slots: list[int], kind: str, every: SlotMetadata) -> SlotMetadata | None:
        holders = self._kind_slots[kind]
        if not holders.intersection(every.seg_slots_host):
            return None
        if holders.issuperset(every.seg_slots_host):
            return every
        masked = [s if s in holders else -1 for s in row_slots]
        return SlotMetadata.from_host(masked, self.num_slots, self.device)
