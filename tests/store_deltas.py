"""Small valid delta files for registry and tier tests, written with the real format writer.

Random rank-2, 3-bit factors for every projection plus dense norm deltas: what the registry checks
(format, fingerprint, shapes, finite values) and what the engine loads, without running compression.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.format import METADATA_KEY, DenseDelta, LowRankDelta, QuantTier, write_delta
from deltaserve.delta_store.packing import pack_bitplanes, quantize_groups

GROUP = 32
RANK = 2
BITS = 3


def _factor(gen: torch.Generator, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = quantize_groups(torch.randn(RANK, d, generator=gen), BITS, GROUP)
    return pack_bitplanes(codes, BITS), scales


def make_delta(base_dir: Path, out: Path, seed: int = 0, fingerprint: str | None = None) -> Path:
    """A deltacome-format delta for the model at ``base_dir`` (its fingerprint unless one is given)."""
    base = open_checkpoint(base_dir)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name in base.names():
        shape = base.shape(name)
        if len(shape) == 1:
            weights[name] = DenseDelta(0.01 * torch.randn(shape, generator=gen).half())
        elif "proj" in name:
            (u_planes, u_scales), (v_planes, v_scales) = _factor(gen, shape[0]), _factor(gen, shape[1])
            s = 0.05 * torch.rand(RANK, generator=gen) + 0.01
            weights[name] = LowRankDelta(tuple(shape), [QuantTier(BITS, RANK, u_planes, u_scales, v_planes, v_scales, s)])
    header = {"method": "deltacome", "base_fingerprint": fingerprint or base.fingerprint(),
              "source": {"base": str(base_dir), "finetuned": f"random seed {seed}"}, "group_size": GROUP,
              "bits_per_param_budget": 1.0, "method_config": {}}
    return write_delta(out, weights, header)


def rewrite(src: Path, out: Path, edit) -> Path:
    """Copy a delta file through ``edit(tensors)`` (in place), bypassing the writer's validation."""
    with safe_open(src, framework="pt") as f:
        metadata = {METADATA_KEY: f.metadata()[METADATA_KEY]}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, out, metadata=metadata)
    return out
