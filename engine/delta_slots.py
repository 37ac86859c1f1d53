"""Every resident tenant's delta for one backbone weight, in slot-stacked device buffers, by kind.

Kinds and how they are applied:
- packed: quantized low-rank tiers (deltacome), `PackedTierSlots` per tier -> kernels.add_lowrank_delta
- sign: BitDelta sign bits + one scale -> kernels.add_sign_delta
- lowrank16: fp16 low-rank factors (svd), all tiers concatenated along the rank -> torch per slot
- dense: full deltas in the backbone dtype -> 2-D (the dense method): torch per slot; 1-D (norms, biases):
  one gather by row slot for the whole batch
Buffers are `[S, ...]` with S = max_slots, allocated the first time a delta of that kind arrives for this
weight and grown (rank, bits, tiers) when a later delta needs more; a slot without a delta of a kind has
rank 0 / zeros there, so the kernels add nothing for it.
"""
from __future__ import annotations

import torch

from deltaserve.delta_store.format import DenseDelta, FloatTier, LowRankDelta, QuantTier, SignDelta, WeightDelta
from deltaserve.delta_store.packing import mid_level, num_groups, num_words
from deltaserve.kernels.slots import PackedTierSlots


def _grown(old: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of `shape` holding `old` in its leading corner (old may be None or already big enough)."""
    if old is not None and tuple(old.shape) == shape:
        return old
    new = torch.zeros(shape, dtype=dtype, device=device)
    if old is not None:
        new[tuple(slice(0, n) for n in old.shape)] = old
    return new


class WeightSlots:
    def __init__(self, name: str, shape: tuple[int, ...], num_slots: int, device: torch.device, dtype: torch.dtype):
        self.name, self.shape, self.num_slots = name, tuple(shape), num_slots
        self.device, self.dtype = device, dtype
        self.group_size = 0                             # of the packed tiers; one per weight (checked by the bank)
        self.packed: list[PackedTierSlots] = []
        self.packed_tiers: list[list[tuple[int, int]]] = [[] for _ in range(num_slots)]  # host copy: (rank, bits)
        self.sign_bits: torch.Tensor | None = None      # int32 [S, d_out, ceil(d_in/32)]
        self.sign_scales: torch.Tensor | None = None    # fp32 [S]
        self.lr_u: torch.Tensor | None = None           # fp16 [S, rank_cap, d_out]
        self.lr_v: torch.Tensor | None = None           # fp16 [S, rank_cap, d_in]
        self.lr_s: torch.Tensor | None = None           # fp32 [S, rank_cap]; 0 past a slot's rank
        self.lr_rank = [0] * num_slots
        self.dense: torch.Tensor | None = None          # backbone dtype [S, *shape]
        self.kinds: list[set[str]] = [set() for _ in range(num_slots)]
        self.torch_slots: set[int] = set()              # slots with a lowrank16 or dense delta here
        self.version = 0                                # bumped after every write/clear: layers rebuild kernel args
        self._plan_cache: tuple[tuple | None, dict] = (None, {})   # copy_plan's views, valid for these buffers

    # ---- writing -------------------------------------------------------------------------------------
    def write(self, slot: int, delta: WeightDelta, group_size: int) -> None:
        """Put `delta` into `slot`, which must be clear (SlotBank.load clears it in every weight first)."""
        self._plan_cache = (None, {})   # it may replace buffers: cached views must not keep the old ones alive
        if isinstance(delta, DenseDelta):
            self.dense = _grown(self.dense, (self.num_slots, *self.shape), self.dtype, self.device)
            self.dense[slot] = delta.delta.to(self.device, self.dtype)
            self.kinds[slot].add("dense")
            self.torch_slots.add(slot)
        elif isinstance(delta, SignDelta):
            d_out, d_in = self.shape
            self.sign_bits = _grown(self.sign_bits, (self.num_slots, d_out, num_words(d_in)), torch.int32, self.device)
            self.sign_scales = _grown(self.sign_scales, (self.num_slots,), torch.float32, self.device)
            self.sign_bits[slot] = delta.signs.to(self.device)
            self.sign_scales[slot] = delta.scale.to(self.device).reshape(())
            self.kinds[slot].add("sign")
        elif isinstance(delta, LowRankDelta):
            quant = [t for t in delta.tiers if isinstance(t, QuantTier)]
            floats = [t for t in delta.tiers if isinstance(t, FloatTier)]
            if quant:
                self._write_packed(slot, quant, group_size)
            if floats:
                self._write_lowrank16(slot, floats)
        else:
            raise TypeError(f"{self.name}: unknown delta type {type(delta).__name__}")
        self.version += 1

    def _write_packed(self, slot: int, tiers: list[QuantTier], group_size: int) -> None:
        d_out, d_in = self.shape
        self.group_size = group_size
        groups = (num_groups(d_in, group_size), num_groups(d_out, group_size))
        for t, q in enumerate(tiers):
            old = self.packed[t] if t < len(self.packed) else None
            if (old is not None and q.bits <= old.bits_cap and q.rank <= old.rank_cap
                    and (old.v_scales.shape[2], old.u_scales.shape[2]) == groups):
                tier = old              # fits: write in place (a new tier would re-check every slot on the device)
                tier.forget(slot)
            else:
                tier = self._grown_tier(old, max(q.bits, old.bits_cap if old else 1),
                                        max(q.rank, old.rank_cap if old else 0), group_size)
                if old is None:
                    self.packed.append(tier)
                else:
                    self.packed[t] = tier
            # Host values bound the kernels' reads: 1 <= bits <= bits_cap and rank <= rank_cap hold by the caps.
            tier.v_planes[slot, : q.bits, : q.rank] = q.v_planes.to(self.device)
            tier.v_scales[slot, : q.rank] = q.v_scales.to(self.device)
            tier.u_planes[slot, : q.bits, : q.rank] = q.u_planes.to(self.device)
            tier.u_scales[slot, : q.rank] = q.u_scales.to(self.device)
            tier.s[slot, : q.rank] = q.s.to(self.device)
            tier.ranks[slot], tier.bits[slot] = q.rank, q.bits
        self.packed_tiers[slot] = [(q.rank, q.bits) for q in tiers]
        self.kinds[slot].add("packed")

    def _grown_tier(self, old: PackedTierSlots | None, bits_cap: int, rank_cap: int,
                    group_size: int) -> PackedTierSlots:
        """A tier's buffers at these caps, holding `old`'s slots (None: all slots empty)."""
        d_out, d_in = self.shape
        S = self.num_slots

        def grow(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return _grown(getattr(old, name) if old else None, shape, dtype, self.device)

        return PackedTierSlots(
            v_planes=grow("v_planes", (S, bits_cap, rank_cap, num_words(d_in)), torch.int32),
            v_scales=grow("v_scales", (S, rank_cap, num_groups(d_in, group_size)), torch.float16),
            u_planes=grow("u_planes", (S, bits_cap, rank_cap, num_words(d_out)), torch.int32),
            u_scales=grow("u_scales", (S, rank_cap, num_groups(d_out, group_size)), torch.float16),
            s=grow("s", (S, rank_cap), torch.float32), ranks=grow("ranks", (S,), torch.int32),
            bits=grow("bits", (S,), torch.int32))

    def _write_lowrank16(self, slot: int, tiers: list[FloatTier]) -> None:
        d_out, d_in = self.shape
        u = torch.cat([t.u for t in tiers])
        v = torch.cat([t.v for t in tiers])
        s = torch.cat([t.s for t in tiers])
        rank = u.shape[0]
        rank_cap = max(rank, self.lr_u.shape[1] if self.lr_u is not None else 0)
        S = self.num_slots
        self.lr_u = _grown(self.lr_u, (S, rank_cap, d_out), torch.float16, self.device)
        self.lr_v = _grown(self.lr_v, (S, rank_cap, d_in), torch.float16, self.device)
        self.lr_s = _grown(self.lr_s, (S, rank_cap), torch.float32, self.device)
        self.lr_u[slot, :rank], self.lr_v[slot, :rank], self.lr_s[slot, :rank] = u, v, s
        self.lr_rank[slot] = rank
        self.kinds[slot].add("lowrank16")
        self.torch_slots.add(slot)

    def clear(self, slot: int) -> None:
        """Zero the slot everywhere, so a stale delta can never leak into the next tenant's rows."""
        for tier in self.packed:
            tier.ranks[slot] = 0
            tier.s[slot] = 0
        for t in (self.sign_scales, self.lr_s, self.dense):
            if t is not None:
                t[slot] = 0
        self._forget(slot)

    def _forget(self, slot: int) -> None:
        """The host-side state of an empty slot (clear's, and commit_plan's before it notes the new delta)."""
        self.packed_tiers[slot] = []
        for tier in self.packed:
            tier.forget(slot)
        self.lr_rank[slot] = 0
        self.kinds[slot].clear()
        self.torch_slots.discard(slot)
        self.version += 1

    # ---- loading as one batched copy (SlotBank.plan_load) ----------------------------------------------------
    def buffers(self) -> tuple:
        """The buffer objects a copy plan writes into: a grown buffer is a new object, which makes a plan stale."""
        return (self.sign_bits, self.sign_scales, self.dense, self.lr_u, self.lr_v, self.lr_s, *self.packed)

    def holds(self, buffers: tuple | None) -> bool:
        """Whether `buffers` (an earlier buffers()) are still exactly this weight's buffers."""
        now = self.buffers()
        return buffers is not None and len(buffers) == len(now) and all(a is b for a, b in zip(buffers, now))

    def copy_plan(self, slot: int, delta: WeightDelta | None, group_size: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(destination view, source) pairs that leave `slot` as clear(slot) then write(slot, delta) would (delta
        None: clear only), in the buffers as they are now; sources on the host or the device. None when that needs a
        buffer first (the first delta of a kind, a larger rank or bit-width, another group size) or is an svd
        delta: SlotBank.load does those. Nothing here changes until commit_plan.

        The views and constants are cached per slot and tier shapes while the buffers stay the same objects: a
        torch call on a loading thread is a GIL round trip, and deltas of one compression setting share shapes."""
        tiers = delta.tiers if isinstance(delta, LowRankDelta) else []
        if any(isinstance(t, FloatTier) for t in tiers) or len(tiers) > len(self.packed):
            return None
        if (isinstance(delta, SignDelta) and self.sign_bits is None) or (isinstance(delta, DenseDelta) and self.dense is None):
            return None
        groups = (num_groups(self.shape[1], group_size), num_groups(self.shape[0], group_size)) if tiers else None
        for q, tier in zip(tiers, self.packed):
            if (q.bits > tier.bits_cap or q.rank > tier.rank_cap
                    or (tier.v_scales.shape[2], tier.u_scales.shape[2]) != groups):
                return None
        if not self.holds(self._plan_cache[0]):
            self._plan_cache = (self.buffers(), {})
        key = (slot, tuple((q.bits, q.rank) for q in tiers), type(delta))
        fixed = self._plan_cache[1].get(key)
        if fixed is None:
            fixed = self._plan_cache[1][key] = self._plan_fixed(slot, tiers, delta)
        destinations, constants = fixed
        sources = []
        for q in tiers:
            sources += [q.v_planes, q.v_scales, q.u_planes, q.u_scales, q.s]
        if isinstance(delta, SignDelta):
            sources += [delta.scale.reshape(()), delta.signs]
        elif isinstance(delta, DenseDelta):
            sources.append(delta.delta.to(self.dtype))
        return list(zip(destinations, sources + constants, strict=True))

    def _plan_fixed(self, slot: int, tiers: list[QuantTier], delta: WeightDelta | None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """copy_plan's destinations: first those taking the delta's tensors (in copy_plan's order), then those
        taking the constants returned beside them (ranks, bits, zeros)."""
        def const(value: int) -> torch.Tensor:
            return torch.tensor([value], dtype=torch.int32, device=self.device)

        def zeros(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros((), dtype=like.dtype, device=self.device).expand(like.shape)

        taking, fixed, constants = [], [], []
        for t, tier in enumerate(self.packed):
            q = tiers[t] if t < len(tiers) else None
            if q is not None:
                taking += [tier.v_planes[slot, : q.bits, : q.rank], tier.v_scales[slot, : q.rank],
                           tier.u_planes[slot, : q.bits, : q.rank], tier.u_scales[slot, : q.rank], tier.s[slot, : q.rank]]
                fixed.append(tier.bits[slot : slot + 1])
                constants.append(const(q.bits))
            rest = tier.s[slot, q.rank if q is not None else 0 :]
            fixed += [rest, tier.ranks[slot : slot + 1]]
            constants += [zeros(rest), const(q.rank if q is not None else 0)]
        if isinstance(delta, SignDelta):
            taking += [self.sign_scales[slot], self.sign_bits[slot]]
        elif self.sign_scales is not None:
            fixed.append(self.sign_scales[slot])
            constants.append(zeros(self.sign_scales[slot]))
        if isinstance(delta, DenseDelta):
            taking.append(self.dense[slot])
        elif self.dense is not None:
            fixed.append(self.dense[slot])
            constants.append(zeros(self.dense[slot]))
        if self.lr_s is not None:
            fixed.append(self.lr_s[slot])
            constants.append(zeros(self.lr_s[slot]))
        return taking + fixed, constants

    def commit_plan(self, slot: int, delta: WeightDelta | None, group_size: int) -> None:
        """The host-side state of clear(slot) then write(slot, delta), once copy_plan's pairs were copied."""
        self._forget(slot)
        tiers = delta.tiers if isinstance(delta, LowRankDelta) else []
        if tiers:
            self.packed_tiers[slot] = [(q.rank, q.bits) for q in tiers]
            self.kinds[slot].add("packed")
            self.group_size = group_size
        elif isinstance(delta, (SignDelta, DenseDelta)):
            self.kinds[slot].add(delta.kind)
        if isinstance(delta, DenseDelta):
            self.torch_slots.add(slot)

    def nbytes(self) -> int:
        tensors = [self.sign_bits, self.sign_scales, self.lr_u, self.lr_v, self.lr_s, self.dense]
        tensors += [getattr(t, f) for t in self.packed for f in ("v_planes", "v_scales", "u_planes", "u_scales", "s")]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---- applying (torch kinds; packed and sign go through the kernels, see layers.DeltaLinear) ----------
    def add_linear(self, y: torch.Tensor, x: torch.Tensor, slot: int, rows: torch.Tensor, offset: int) -> None:
        """y[rows, offset:offset+d_out] += x[rows] @ delta^T for the torch kinds of this slot (in torch_slots)."""
        kinds = self.kinds[slot]
        d_out = self.shape[0]
        xs = x[rows].float()
        out = torch.zeros(xs.shape[0], d_out, dtype=torch.float32, device=x.device)
        if "lowrank16" in kinds:
            r = self.lr_rank[slot]
            # Rank-r intermediate kept in fp32 (Punica lost accuracy by rounding it to half precision).
            z = (xs @ self.lr_v[slot, :r].float().T) * self.lr_s[slot, :r]
            out += z @ self.lr_u[slot, :r].float()
        if "dense" in kinds:
            out += xs @ self.dense[slot].float().T
        y[rows, offset : offset + d_out] += out.to(y.dtype)

    def row_vectors(self, gather_slots: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor | None:
        """The 1-D delta (norm weight or bias) of each row's slot [B, d], zeros for base rows; None if no slot
        has one. One gather for the whole batch, however many tenants it mixes (arguments: see DeltaRows)."""
        if not self.torch_slots:
            return None
        return self.dense.index_select(0, gather_slots).masked_fill(base_mask, 0)

    def embedding_rows(self, slot: int, token_ids: torch.Tensor) -> torch.Tensor | None:
        """delta[token_ids] [n, d_in] of an embedding matrix [vocab, hidden] in fp32, or None if no delta."""
        kinds = self.kinds[slot]
        if not kinds:
            return None
        out = torch.zeros(token_ids.shape[0], self.shape[1], dtype=torch.float32, device=self.device)
        if "dense" in kinds:
            out += self.dense[slot, token_ids].float()
        if "sign" in kinds:
            words = self.sign_bits[slot, token_ids]                                # [n, W]
            bits = (words.unsqueeze(-1) >> torch.arange(32, device=self.device)) & 1  # [n, W, 32]
            signs = bits.reshape(words.shape[0], -1)[:, : self.shape[1]].float() * 2 - 1
            out += self.sign_scales[slot] * signs
        if "lowrank16" in kinds:
            r = self.lr_rank[slot]
            out += (self.lr_u[slot, :r, token_ids].float().T * self.lr_s[slot, :r]) @ self.lr_v[slot, :r].float()
        for tier, (r, b) in zip(self.packed, self.packed_tiers[slot]):     # host ranks: no device read
            if r:
                u = _packed_columns(tier.u_planes[slot, :b, :r], tier.u_scales[slot, :r], token_ids, self.group_size)
                v = _packed_columns(tier.v_planes[slot, :b, :r], tier.v_scales[slot, :r],
                                    torch.arange(self.shape[1], device=self.device), self.group_size)
                out += (u.T * tier.s[slot, :r]) @ v
        return out


def _packed_columns(planes: torch.Tensor, scales: torch.Tensor, cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantized columns `cols` of a bit-plane factor (planes int32 [b, r, W], scales fp16 [r, G]) -> fp32 [r, n].

    Reads only the words holding those columns, so an embedding lookup never unpacks the whole vocabulary.
    """
    bits = planes.shape[0]
    words = planes[:, :, cols // 32]                                     # [b, r, n]
    codes = torch.zeros(words.shape[1:], dtype=torch.int32, device=planes.device)
    for p in range(bits):
        codes |= ((words[p] >> (cols % 32)) & 1) << p
    return (codes.float() - mid_level(bits)) * scales[:, cols // group_size].float()
