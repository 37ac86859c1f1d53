"""Backbone layers that add each row's tenant delta: linear (fused parts), RMSNorm, embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.engine.delta_slots import WeightSlots
from deltaserve.engine.slot_bank import DeltaRows
from deltaserve.kernels import (LowRankPlan, LowRankProjection, SignPlan, SignProjection, add_lowrank_delta,
                                add_sign_delta, lowrank_plan_for, sign_plan_for)
from deltaserve.kernels.rms_norm import add_rms_norm, add_rms_norm_reference


def _empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class DeltaLinear(torch.nn.Module):
    """y = x W^T (+ b) + delta(x, slot of row), W the row-stack of `parts` (q|k|v, gate|up, or one weight).

    Equivalent loop: for each row i with slot k >= 0 and each part p at offset o:
        y[i, o : o + d_out_p] += x[i] @ delta_k(p)^T (+ bias delta_k(p))
    """

    def __init__(self, d_in: int, parts: list[WeightSlots], biases: list[WeightSlots] | None,
                 device: torch.device, dtype: torch.dtype, weight: torch.nn.Parameter | None = None):
        super().__init__()
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p.shape[0])
        self.parts = list(zip(parts, offsets))
        self.biases = list(zip(biases, offsets)) if biases else []
        self.weight = weight if weight is not None else _empty((offsets[-1], d_in), device, dtype)
        self.bias = _empty((offsets[-1],), device, dtype) if biases else None
        self._versions: tuple[int, ...] | None = None     # of the parts when the kernel arguments below were made
        self._packed: list[LowRankProjection] = []
        self._group_size = 0
        self._sign: list[SignProjection] = []
        self._packed_plan: LowRankPlan | None = None      # the kernels' descriptor tables of the lists above
        self._sign_plan: SignPlan | None = None
        self.use_kernels: bool | None = None                # None: the Triton kernels on CUDA, PyTorch elsewhere

    def _kernel_args(self) -> None:
        """Rebuild the kernels' projection lists, only after a slot of one of the parts changed (not per step)."""
        versions = tuple(w.version for w, _ in self.parts)     # read first: a write racing this rebuilds next time
        if versions == self._versions:
            return
        self._packed = [LowRankProjection(off, w.shape[0], w.packed) for w, off in self.parts if w.packed]
        self._group_size = next((w.group_size for w, _ in self.parts if w.packed), 0)
        self._sign = [SignProjection(off, w.sign_bits, w.sign_scales) for w, off in self.parts
                      if w.sign_bits is not None]
        self._packed_plan = lowrank_plan_for(self._packed) if self._packed else None
        self._sign_plan = sign_plan_for(self._sign) if self._sign else None
        self._versions = versions

    def forward(self, x: torch.Tensor, rows: DeltaRows | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if rows is None:
            return y
        self._kernel_args()
        if rows.packed is not None and self._packed:
            add_lowrank_delta(y, x, rows.packed, self._packed, self._group_size, self.use_kernels,
                              self._packed_plan)
        if rows.sign is not None and self._sign:
            add_sign_delta(y, x, rows.sign, self._sign, self.use_kernels, self._sign_plan)
        for b, off in self.biases:
            db = b.row_vectors(rows.gather_slots, rows.base_mask)
            if db is not None:
                y[:, off : off + b.shape[0]] += db
        # Python loops only over (part, slot) pairs that hold a torch-applied delta: none for packed/sign tenants.
        for w, off in self.parts:
            if w.torch_slots:
                for slot, idx in rows.groups:
                    if slot in w.torch_slots:
                        w.add_linear(y, x, slot, idx, off)
        return y


class DeltaRMSNorm(torch.nn.Module):
    """RMSNorm whose weight is w + delta_w[slot] per row; add_and_norm also adds the residual stream first."""

    def __init__(self, slots: WeightSlots, eps: float, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.slots = slots
        self.eps = eps
        self.weight = _empty(slots.shape, device, dtype)

    def forward(self, x: torch.Tensor, rows: DeltaRows | None) -> torch.Tensor:
        return self.add_and_norm(x, None, rows)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None, rows: DeltaRows | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s) * merged weight of each row, s) with s = x + residual (x when residual is None): one Triton
        launch on CUDA; the torch ops elsewhere, which on CPU give transformers' bits."""
        # The per-row deltas only while some slot holds one (a host set: no device read, and part of a captured
        # graph's layout key).
        deltas = self.slots.dense if rows is not None and self.slots.torch_slots else None
        slots = rows.row_slots if deltas is not None else None
        norm = add_rms_norm if x.is_cuda else add_rms_norm_reference
        return norm(x, residual, self.weight, self.eps, deltas, slots)


class DeltaEmbedding(torch.nn.Module):
    def __init__(self, slots: WeightSlots, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.slots = slots
        self.weight = _empty(slots.shape, device, dtype)

    def forward(self, token_ids: torch.Tensor, rows: DeltaRows | None) -> torch.Tensor:
        out = F.embedding(token_ids, self.weight)
        if rows is not None:
            for slot, idx in rows.groups:
                d = self.slots.embedding_rows(slot, token_ids[idx])
                if d is not None:
                    out[idx] = (out[idx].float() + d).to(out.dtype)
        return out
