"""Slot-stacked delta buffers the kernels read, and the checks every launcher runs on them.

A slot is one resident tenant. Buffers are preallocated `[S, ...]` for S slots at the largest rank and
bit-width the slot capacity allows; each slot records the rank and bit-width it actually uses, so one
compiled kernel serves every tenant. Bit-plane layout: deltaserve.delta_store.packing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltaserve.delta_store.packing import MAX_BITS, check_group_size, dequantize, num_groups, num_words

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


@dataclass
class PackedTierSlots:
    """One quantized tier of a low-rank delta for every slot.

    Slot k contributes u[:r]^T @ diag(s[:r]) @ v[:r] with r = ranks[k] and b = bits[k] bit planes, where
    v = dequantize(v_planes[k, :b, :r], v_scales[k, :r]) and likewise u. Rank 0 means the tier is empty.
    """

    v_planes: torch.Tensor  # int32 [S, bits_cap, rank_cap, ceil(d_in/32)]
    v_scales: torch.Tensor  # fp16  [S, rank_cap, ceil(d_in/G)]
    u_planes: torch.Tensor  # int32 [S, bits_cap, rank_cap, ceil(d_out/32)]
    u_scales: torch.Tensor  # fp16  [S, rank_cap, ceil(d_out/G)]
    s: torch.Tensor  # fp32 [S, rank_cap]
    ranks: torch.Tensor  # int32 [S]
    bits: torch.Tensor  # int32 [S]
    # Dequantized factors for the PyTorch path, keyed (factor, slot, d, group_size). Unpacking bit planes
    # costs far more than the matmul, so on CPU each slot is unpacked once, not at every layer of every step.
    # Writers build a new PackedTierSlots per write (the engine does) or call forget(slot).
    _dense: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # (d_in, d_out, group_size) that check_dims accepted: buffer shapes never change in place (the engine makes a
    # new PackedTierSlots to grow one), so a launcher checks each once, not at every layer of every step.
    _dims_ok: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.v_planes.dim() != 4 or self.u_planes.dim() != 4:
            raise ValueError("v_planes and u_planes must be 4-D [S, bits_cap, rank_cap, words]")
        S, bits_cap, rank_cap, _ = self.v_planes.shape
        if not 1 <= bits_cap <= MAX_BITS:
            raise ValueError(f"bits_cap must be in 1..{MAX_BITS}, got {bits_cap}")
        _expect(self.v_planes, "v_planes", torch.int32, tuple(self.v_planes.shape))
        _expect(self.u_planes, "u_planes", torch.int32, (S, bits_cap, rank_cap, self.u_planes.shape[3]))
        _expect(self.v_scales, "v_scales", torch.float16, (S, rank_cap, self.v_scales.shape[2]))
        _expect(self.u_scales, "u_scales", torch.float16, (S, rank_cap, self.u_scales.shape[2]))
        _expect(self.s, "s", torch.float32, (S, rank_cap))
        _expect(self.ranks, "ranks", torch.int32, (S,))
        _expect(self.bits, "bits", torch.int32, (S,))
        devices = {t.device for t in (self.v_planes, self.v_scales, self.u_planes, self.u_scales, self.s,
                                      self.ranks, self.bits)}
        if len(devices) != 1:
            raise ValueError(f"tier tensors are on several devices: {sorted(map(str, devices))}")
        self.check_values()

    def dense_factor(self, factor: str, slot: int, d: int, group_size: int) -> torch.Tensor:
        """Slot `slot`'s dequantized v (factor "v", d = d_in) or u ("u", d = d_out): fp32 [rank, d] (rank 0 for an
        empty tier). Cached on CPU: its shape gives the references the slot's rank without reading the device."""
        key = (factor, slot, d, group_size)
        if key in self._dense:
            return self._dense[key]
        r, b = int(self.ranks[slot]), int(self.bits[slot])
        planes, scales = (self.v_planes, self.v_scales) if factor == "v" else (self.u_planes, self.u_scales)
        dense = (dequantize(planes[slot, :b, :r], scales[slot, :r], d, group_size) if r else
                 torch.zeros(0, d, device=self.device))
        if self.device.type == "cpu":   # on a GPU the fp32 factors of many 7B tenants would not fit
            self._dense[key] = dense
        return dense

    def forget(self, slot: int) -> None:
        """Drop slot `slot`'s cached dequantized factors (after its buffers were changed in place)."""
        for key in [k for k in self._dense if k[1] == slot]:
            del self._dense[key]

    @property
    def num_slots(self) -> int:
        return self.v_planes.shape[0]

    @property
    def bits_cap(self) -> int:
        return self.v_planes.shape[1]

    @property
    def rank_cap(self) -> int:
        return self.v_planes.shape[2]

    @property
    def device(self) -> torch.device:
        return self.v_planes.device

    def check_values(self) -> None:
        """Per-slot rank in [0, rank_cap] and bit-width in [1, bits_cap] wherever the rank is not 0.

        Reads the device (one sync): run it after writing a slot, not per step. Kernels trust these values
        to bound their loads, so a bad one would read past the slot.
        """
        ranks, bits = self.ranks.tolist(), self.bits.tolist()
        for k, (r, b) in enumerate(zip(ranks, bits)):
            if not 0 <= r <= self.rank_cap:
                raise ValueError(f"slot {k}: rank {r} outside [0, {self.rank_cap}]")
            if r and not 1 <= b <= self.bits_cap:
                raise ValueError(f"slot {k}: bits {b} outside [1, {self.bits_cap}]")

    def check_dims(self, d_in: int, d_out: int, group_size: int, where: str) -> None:
        """Word and group counts of the buffers match a d_in x d_out weight at this group size."""
        if (d_in, d_out, group_size) in self._dims_ok:
            return
        for name, t, axis, want in (
            ("v_planes", self.v_planes, 3, num_words(d_in)),
            ("v_scales", self.v_scales, 2, num_groups(d_in, group_size)),
            ("u_planes", self.u_planes, 3, num_words(d_out)),
            ("u_scales", self.u_scales, 2, num_groups(d_out, group_size)),
        ):
            if t.shape[axis] != want:
                raise ValueError(
                    f"{where}.{name} has {t.shape[axis]} on axis {axis}, d_in={d_in} d_out={d_out} "
                    f"group_size={group_size} need {want}"
                )
        self._dims_ok.add((d_in, d_out, group_size))


@dataclass
class LowRankProjection:
    """y[:, out_offset : out_offset + d_out] += delta(x) summed over tiers; stacked q|k|v are 3 of these."""

    out_offset: int
    d_out: int
    tiers: list[PackedTierSlots]

    def __post_init__(self) -> None:
        if self.out_offset < 0 or self.d_out <= 0:
            raise ValueError(f"bad projection: out_offset={self.out_offset}, d_out={self.d_out}")


@dataclass
class SignProjection:
    """BitDelta: y[:, off : off + d_out] += scales[slot] * x @ (2 * bit - 1)^T, bit 1 = positive."""

    out_offset: int
    signs: torch.Tensor  # int32 [S, d_out, ceil(d_in/32)]
    scales: torch.Tensor  # fp32 [S]

    def __post_init__(self) -> None:
        if self.out_offset < 0:
            raise ValueError(f"bad projection: out_offset={self.out_offset}")
        if self.signs.dim() != 3:
            raise ValueError(f"signs must be int32 [S, d_out, words], got {list(self.signs.shape)}")
        _expect(self.signs, "signs", torch.int32, tuple(self.signs.shape))
        _expect(self.scales, "scales", torch.float32, (self.signs.shape[0],))
        if self.signs.device != self.scales.device:
            raise ValueError("signs and scales are on different devices")

    @property
    def d_out(self) -> int:
        return self.signs.shape[1]


def check_call(y: torch.Tensor, x: torch.Tensor, num_rows: int, num_slots: int, slots_device: torch.device,
               spans: list[tuple[int, int]], buffer_slots: list[int], buffer_devices: list[torch.device]) -> None:
    """Checks shared by every delta launcher; `spans` are the (out_offset, d_out) of the projections."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D [B, d], got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, y has {y.shape[0]}")
    if x.shape[0] != num_rows:
        raise ValueError(f"slot metadata is for {num_rows} rows, the batch has {x.shape[0]}")
    if x.dtype != y.dtype or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x and y must share a dtype among {ACTIVATION_DTYPES}, got {x.dtype} and {y.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y must have unit stride along their last dimension")
    devices = {x.device, y.device, slots_device, *buffer_devices}
    if len(devices) != 1:
        raise ValueError(f"x, y, slot metadata and delta buffers are on several devices: {sorted(map(str, devices))}")
    for k, s in enumerate(buffer_slots):
        if s != num_slots:
            raise ValueError(f"slot metadata was built for {num_slots} slots, buffer {k} holds {s}")
    for off, d in spans:
        if off + d > y.shape[1]:
            raise ValueError(f"projection [{off}, {off + d}) exceeds y's {y.shape[1]} columns")


def check_lowrank_call(y: torch.Tensor, x: torch.Tensor, num_rows: int, num_slots: int, slots_device: torch.device,
                       projections: list[LowRankProjection], group_size: int) -> None:
    check_group_size(group_size)
    tiers = [t for p in projections for t in p.tiers]
    check_call(y, x, num_rows, num_slots, slots_device, [(p.out_offset, p.d_out) for p in projections],
               [t.num_slots for t in tiers], [t.device for t in tiers])
    for j, p in enumerate(projections):
        for i, t in enumerate(p.tiers):
            t.check_dims(x.shape[1], p.d_out, group_size, f"projections[{j}].tiers[{i}]")


def check_sign_call(y: torch.Tensor, x: torch.Tensor, num_rows: int, num_slots: int, slots_device: torch.device,
                    projections: list[SignProjection]) -> None:
    check_call(y, x, num_rows, num_slots, slots_device, [(p.out_offset, p.d_out) for p in projections],
               [p.signs.shape[0] for p in projections], [p.signs.device for p in projections])
    for j, p in enumerate(projections):
        if p.signs.shape[2] != num_words(x.shape[1]):
            raise ValueError(f"projections[{j}].signs has {p.signs.shape[2]} words per row, "
                             f"d_in={x.shape[1]} needs {num_words(x.shape[1])}")
