"""Helpers shared by the engine tests: tiny bases with three compressed tenants, merged-model references."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deltaserve.delta_store import DeltaFile, load_delta
from deltaserve.delta_store.compress import compress
from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams
from tiny_models import make_finetune, make_tiny_model

METHODS = ("deltacome", "bitdelta", "svd")
# Random init at the usual std 0.02 gives near-uniform logits, where the order of fp32 additions alone picks
# the argmax; a wider init gives the clear margins a trained model has, so greedy equality is meaningful.
INIT = dict(initializer_range=0.2)
CASES = {
    "llama_mha_tied": dict(arch="llama"),
    "llama_gqa_untied": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2_gqa_bias": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=False),
}
PROMPTS = ([5, 17, 33, 80, 9, 44], [100, 2, 45, 61, 7, 7, 7, 12, 19, 30, 31], [250, 3], [64] * 9)


@dataclass
class Tenants:
    base: Path
    deltas: list[DeltaFile]      # slot i holds deltas[i], made with METHODS[i]


def make_tenants(root: Path, case: str) -> Tenants:
    base = make_tiny_model(root / "base", **CASES[case], **INIT)
    deltas = []
    for i, method in enumerate(METHODS):
        finetuned = make_finetune(base, root / f"ft_{method}", seed=20 + i, scale=1.0)
        out = compress(base, finetuned, root / f"{method}.safetensors", method=method, bits_per_param=1.0,
                       group_size=32)
        deltas.append(load_delta(out))
    return Tenants(base, deltas)


def make_engine(tenants: Tenants, **overrides) -> LLMEngine:
    settings = dict(model=str(tenants.base), max_slots=len(tenants.deltas), num_kv_blocks=64, block_size=4,
                    max_num_batched_tokens=16)
    engine = LLMEngine(EngineConfig(**{**settings, **overrides}))
    for slot, delta in enumerate(tenants.deltas):
        engine.load_delta(slot, delta)
    return engine


def greedy(max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; request id -> every token it produced."""
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def merged_model(tenants: Tenants, slot: int) -> torch.nn.Module:
    """transformers' model of base + the tenant's reconstructed delta (slot -1: the base), fp32."""
    model = AutoModelForCausalLM.from_pretrained(tenants.base, dtype=torch.float32)
    if slot >= 0:
        state = model.state_dict()
        for name, delta in tenants.deltas[slot].dense_deltas().items():
            state[name] += delta        # tied embeddings: lm_head shares this tensor, so it changes too
        model.load_state_dict(state)
    return model


def merged_greedy(tenants: Tenants, slot: int, prompt: list[int], max_tokens: int = 32,
                  repetition_penalty: float = 1.0) -> list[int]:
    """transformers' greedy tokens for base + the tenant's reconstructed delta (slot -1: the base)."""
    ids = torch.tensor([prompt])
    # An explicit mask: otherwise generate masks out prompt tokens that equal the pad id.
    out = merged_model(tenants, slot).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                               min_new_tokens=max_tokens, do_sample=False,
                                               repetition_penalty=repetition_penalty)
    return out[0, len(prompt):].tolist()
