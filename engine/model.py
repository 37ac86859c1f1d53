"""Llama-family decoder (Llama 2/3, Mistral, Qwen2; GQA; optional qkv bias; tied or untied embeddings)
with fused q|k|v and gate|up, paged attention, and each row's tenant delta in every layer."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from deltaserve.delta_store.checkpoint import Checkpoint
from deltaserve.engine.attention import AttentionMetadata, DecodeAttention, paged_attention
from deltaserve.engine.layers import DeltaEmbedding, DeltaLinear, DeltaRMSNorm
from deltaserve.engine.rotary import RotaryEmbedding
from deltaserve.engine.slot_bank import DeltaRows, SlotBank
from deltaserve.kernels.rotary_cache import rotary_cache, rotary_cache_reference
from deltaserve.kernels.swiglu import silu_mul, silu_mul_reference

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_supported(config: PretrainedConfig, max_model_len: int) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {config.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SwiGLU with silu only)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and max_model_len > window:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's sliding window {window}, "
                         "which this engine does not implement; lower max_model_len")


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderLayer(torch.nn.Module):
    def __init__(self, i: int, config: PretrainedConfig, bank: SlotBank, device: torch.device, dtype: torch.dtype):
        super().__init__()
        w = bank.weights
        p = f"model.layers.{i}."
        h = config.hidden_size
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        qkv = [w[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        self.qkv_proj = DeltaLinear(h, qkv, [w[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"] if qkv_bias else None,
                                    device, dtype)
        o_bias = [w[f"{p}self_attn.o_proj.bias"]] if getattr(config, "attention_bias", False) else None
        self.o_proj = DeltaLinear(self.num_heads * self.head_dim, [w[f"{p}self_attn.o_proj.weight"]], o_bias,
                                  device, dtype)
        self.gate_up_proj = DeltaLinear(h, [w[f"{p}mlp.gate_proj.weight"], w[f"{p}mlp.up_proj.weight"]], None,
                                        device, dtype)
        self.down_proj = DeltaLinear(config.intermediate_size, [w[f"{p}mlp.down_proj.weight"]], None, device, dtype)
        eps = config.rms_norm_eps
        self.input_layernorm = DeltaRMSNorm(w[f"{p}input_layernorm.weight"], eps, device, dtype)
        self.post_attention_layernorm = DeltaRMSNorm(w[f"{p}post_attention_layernorm.weight"], eps, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMetadata | DecodeAttention,
                rows: DeltaRows | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream kept as (x, residual), their sum the hidden state (residual None: x
        alone, the first layer), as vLLM does: each add is fused into the norm after it. Returns the new pair.
        rope: the step's (cos, sin) from RotaryEmbedding."""
        h, residual = self.input_layernorm.add_and_norm(x, residual, rows)
        qkv = self.qkv_proj(h, rows)
        write = rotary_cache if qkv.is_cuda else rotary_cache_reference
        q = write(qkv, *rope, k_cache, v_cache, attn.slot_mapping, self.num_heads)
        out = paged_attention(q, k_cache, v_cache, attn, self.head_dim ** -0.5)
        h, residual = self.post_attention_layernorm.add_and_norm(self.o_proj(out, rows), residual, rows)
        act = silu_mul if h.is_cuda else silu_mul_reference
        return self.down_proj(act(self.gate_up_proj(h, rows)), rows), residual


class LlamaModel(torch.nn.Module):
    def __init__(self, config: PretrainedConfig, bank: SlotBank, max_positions: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.config = config
        w = bank.weights
        self.embed_tokens = DeltaEmbedding(w["model.embed_tokens.weight"], device, dtype)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(i, config, bank, device, dtype) for i in range(config.num_hidden_layers))
        self.norm = DeltaRMSNorm(w["model.norm.weight"], config.rms_norm_eps, device, dtype)
        self.rope = RotaryEmbedding(config, head_dim_of(config), max_positions, device, dtype)
        # Tied embeddings: the head is the embedding matrix, so the embedding's delta applies to it too.
        head = w["model.embed_tokens.weight"] if config.tie_word_embeddings else w["lm_head.weight"]
        tied = self.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = DeltaLinear(config.hidden_size, [head], None, device, dtype, weight=tied)

    def forward(self, token_ids: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn: AttentionMetadata, rows: DeltaRows | None) -> torch.Tensor:
        """token_ids [T] -> final hidden states [T, hidden] (before the head)."""
        return self.decoder(self.embed_tokens(token_ids, rows), kv_caches, attn, rows)

    def decoder(self, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn: AttentionMetadata | DecodeAttention, rows: DeltaRows | None) -> torch.Tensor:
        """Embedded tokens [T, hidden] through every layer (what a decode graph captures)."""
        rope = self.rope(attn.positions)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, k_cache, v_cache, attn, rows)
        return x + residual if residual is not None else x

    def use_delta_kernels(self, enabled: bool) -> None:
        """False: every linear takes the PyTorch delta path even on CUDA (the benchmarks' baseline)."""
        for module in self.modules():
            if isinstance(module, DeltaLinear):
                module.use_kernels = None if enabled else False

    def logits(self, hidden: torch.Tensor, rows: DeltaRows | None) -> torch.Tensor:
        """hidden [B, hidden] of the rows to sample (final norm applied here) -> fp32 logits [B, vocab]."""
        return self.lm_head(self.norm(hidden, rows), rows).float()

    @torch.inference_mode()
    def load_weights(self, checkpoint: Checkpoint) -> None:
        """Copy every checkpoint tensor into its (possibly fused) parameter, one tensor at a time."""
        targets: dict[str, tuple[torch.Tensor, int]] = {}
        for module in self.modules():
            if isinstance(module, DeltaLinear):
                for slots, off in module.parts:
                    targets[slots.name] = (module.weight, off)
                for slots, off in module.biases:
                    targets[slots.name] = (module.bias, off)
            elif isinstance(module, (DeltaRMSNorm, DeltaEmbedding)):
                targets[module.slots.name] = (module.weight, 0)
        missing = set(targets) - set(checkpoint.names())
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:3]} (and {max(0, len(missing) - 3)} more)")
        for name in checkpoint.names():
            if name not in targets:
                continue        # e.g. rotary inv_freq buffers some exports carry
            param, off = targets[name]
            tensor = checkpoint.get(name, dtype=param.dtype)
            param[off : off + tensor.shape[0]].copy_(tensor)
