"""Tiny random checkpoints for tests: Llama/Qwen2-shaped models, a small tokenizer, synthetic fine-tunes.

Everything is made on the spot (no downloads). Fine-tunes are base + a perturbation whose singular values
fall off like a power law, which is how real fine-tune deltas look (Delta-CoMe, Fig. 1): a few large
directions and a long tail.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests of a multi-tenant server",
    "1 + 2 = 3; 12 * 7 = 84; {\"name\": \"value\", \"count\": 42}",
    "Bonjour le monde. Guten Tag. The answer is forty-two.",
] * 4


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic) with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    tie_word_embeddings: bool = True,
    **config_overrides,
) -> Path:
    """Save a random model and its tokenizer as a Hugging Face folder; returns the folder."""
    tokenizer = make_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common.update(config_overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    # Random init leaves norm weights at exactly 1; vary them so norm deltas and norms are exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def long_tailed_delta(shape: tuple[int, int], gen: torch.Generator, scale: float, decay: float = 1.0) -> torch.Tensor:
    """A matrix with singular values s_k = scale * (k+1)^-decay and random orthonormal singular vectors."""
    rows, cols = shape
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen))
    s = scale * torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def make_finetune(base: Path, path: Path, seed: int = 1, scale: float = 0.5, skip: tuple[str, ...] = ()) -> Path:
    """Copy ``base`` to ``path`` with every tensor perturbed by a long-tailed delta (names in ``skip`` kept)."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            for name, tensor in tensors.items():
                if any(s in name for s in skip):
                    continue
                if tensor.ndim == 2:
                    delta = long_tailed_delta(tuple(tensor.shape), gen, scale)
                else:
                    delta = 0.05 * torch.randn(tensor.shape, generator=gen)
                tensors[name] = (tensor.float() + delta).to(tensor.dtype)
            save_file(tensors, path / file.name, metadata={"format": "pt"})
        else:
            (path / file.name).write_bytes(file.read_bytes())
    return path
