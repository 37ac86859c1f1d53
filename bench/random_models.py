"""Random stand-ins for benchmarks: a Llama-2-7B-shaped checkpoint and Delta-CoMe-tiered packed deltas.

Time depends on shapes and bit-widths, not on values, so random weights and random bit planes measure the
same work as real ones (quality is measured on real fine-tunes in bench/quality.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, PreTrainedTokenizerFast

from deltaserve.delta_store.format import DeltaFile, LowRankDelta, QuantTier, SignDelta
from deltaserve.delta_store.packing import num_groups, num_words

G = 128
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2)
# ChatML, so chat requests to the server render without a model-specific template.
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over tokens t0..t{V-1} (plus the chat markers): every id decodes, and
    it saves and reloads with any transformers version, unlike a tokenizer converted from GGUF."""
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def random_7b(folder: Path, device: str) -> Path:
    """A Llama-2-7B-shaped checkpoint of random bf16 weights (std 0.02), one shard per layer, made once."""
    if (folder / "tokenizer_config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA2_7B)
    gen_device = device if device.startswith("cuda") else "cpu"
    h, f = config.hidden_size, config.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, device=gen_device, dtype=torch.bfloat16)).cpu()

    save_file({"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": torch.ones(h).bfloat16(),
               "lm_head.weight": rand(config.vocab_size, h)}, folder / "model-00000.safetensors")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"}
        layer |= {p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                  p + "mlp.down_proj.weight": rand(h, f), p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                  p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()}
        save_file(layer, folder / f"model-{i + 1:05d}.safetensors")
    config.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)  # written last: marks the folder complete
    return folder


def deltacome_tiers(d_in: int, d_out: int, bits_per_param: float = 1.0) -> list[tuple[int, int]]:
    """[(rank, bits)] of Delta-CoMe's released setting (2 @ 8, 32 @ 3, then @ 2) scaled to the budget, every
    code, fp16 group scale and fp32 singular value counted."""
    def cost(rank: int, bits: int) -> int:
        return rank * (bits * (d_in + d_out) + 16 * (num_groups(d_in, G) + num_groups(d_out, G)) + 32)
    left = bits_per_param * d_in * d_out - cost(2, 8) - cost(32, 3)
    return [(2, 8), (32, 3), (max(1, int(left // cost(1, 2))), 2)]


def random_delta(shapes: dict[str, tuple[int, ...]], fingerprint: str, seed: int,
                 bits_per_param: float = 1.0) -> DeltaFile:
    """A deltacome DeltaFile for every weight matrix of `shapes`, random codes and scales, seeded."""
    g = torch.Generator().manual_seed(seed)

    def planes(bits: int, rank: int, d: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, (bits, rank, num_words(d)), generator=g, dtype=torch.int64
                             ).to(torch.int32)

    def scales(rank: int, d: int) -> torch.Tensor:
        return torch.rand(rank, num_groups(d, G), generator=g).half() * 1e-2

    weights = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        d_out, d_in = shape
        tiers = [QuantTier(bits, rank, planes(bits, rank, d_out), scales(rank, d_out), planes(bits, rank, d_in),
                           scales(rank, d_in), torch.rand(rank, generator=g))
                 for rank, bits in deltacome_tiers(d_in, d_out, bits_per_param)]
        weights[name] = LowRankDelta(tuple(shape), tiers)
    return DeltaFile({"method": "deltacome", "base_fingerprint": fingerprint, "group_size": G}, weights)


def block_shapes(shapes: dict[str, tuple[int, ...]], embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """The weight matrices a delta method compresses: the transformer blocks' linear layers, as in BitDelta and
    Delta-CoMe; with `embeddings`, embed_tokens and lm_head too. 1-D tensors are left out."""
    def is_embedding(name: str) -> bool:
        return "embed_tokens" in name or name.split(".")[0] == "lm_head"
    return {n: tuple(s) for n, s in shapes.items() if len(s) == 2 and (embeddings or not is_embedding(n))}


def random_sign_delta(shapes: dict[str, tuple[int, ...]], fingerprint: str, seed: int,
                      embeddings: bool = False) -> DeltaFile:
    """A bitdelta DeltaFile (random signs, one scale per matrix), seeded, for the weight matrices of `shapes`:
    the blocks' linear layers, and embed_tokens / lm_head only with `embeddings`."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (d_out, d_in) in block_shapes(shapes, embeddings).items():
        signs = torch.randint(-2**31, 2**31 - 1, (d_out, num_words(d_in)), generator=g, dtype=torch.int64)
        if d_in % 32:
            signs[:, -1] &= (1 << d_in % 32) - 1        # no sign bits past the last column
        weights[name] = SignDelta(signs.to(torch.int32), torch.rand(1, generator=g) * 1e-3, (d_out, d_in))
    return DeltaFile({"method": "bitdelta", "base_fingerprint": fingerprint, "group_size": G}, weights)
