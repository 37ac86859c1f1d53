"""Rotary position embedding with the scalings Llama-family configs use (none, linear, llama3)."""
from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig


def rope_parameters(config: PretrainedConfig) -> dict:
    """rope_type, rope_theta and scaling fields, from transformers 5 (`rope_parameters`) or 4 (`rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    """fp32 [head_dim / 2] angular frequencies, scaled as the config asks."""
    params = rope_parameters(config)
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (Llama-family models rotate all dims)")
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, params)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_scaling(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, slowed)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position up to max_positions, looked up by position id."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        inv_freq = inverse_frequencies(config, head_dim).to(device)
        angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)       # [P, head_dim]: the half-split (GPT-NeoX) layout
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, head_dim]: looked up once per step, shared by every layer (the rotation
        itself: kernels/rotary_cache.py)."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

