"""Engine decode throughput: tokens/s at batch sizes x distinct tenants, deltas ~1 bit/param (Delta-CoMe tiers).

Models: the embedded SmolLM2-135M, or a random model with Llama-2-7B shapes written once to --work (random
values: the time depends on shapes, not values). Tenant deltas are random packed low-rank deltas with the
Delta-CoMe tiering (2 ranks at 8 bits, 32 at 3, the rest at 2 up to 1 bit/param, every scale counted), for
every weight matrix including embeddings. Each row of a batch of B uses tenant (row % T); T = 0 is the base.
The clock covers decode steps only, after every request's prefill.

Usage: python bench/engine_decode.py --model smollm2|llama2-7b [--device cuda] [--dtype bfloat16]
           [--batches 1,64] [--tenants 0,1,16] [--steps 32] [--prompt-len 128] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from deltaserve.delta_store.checkpoint import default_model_path, open_checkpoint
from deltaserve.delta_store.format import DeltaFile, LowRankDelta, QuantTier
from deltaserve.delta_store.packing import num_groups, num_words
from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams

G = 128
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def random_7b(folder: Path, device: str) -> Path:
    """A Llama-2-7B-shaped checkpoint of random bf16 weights (std 0.02), one shard per layer, made once."""
    if (folder / "config.json").exists():
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
    # Prompts are random ids below the vocabulary size; any tokenizer serves (SmolLM2's ships with us).
    open_checkpoint(default_model_path()).tokenizer().save_pretrained(folder)
    return folder


def deltacome_tiers(d_out: int, d_in: int, bits_per_param: float = 1.0) -> list[tuple[int, int]]:
    """[(rank, bits)] of Delta-CoMe's released setting, scaled to the budget (codes, fp16 scales, fp32 s)."""
    def cost(rank: int, bits: int) -> int:
        return rank * (bits * (d_in + d_out) + 16 * (num_groups(d_in, G) + num_groups(d_out, G)) + 32)
    left = bits_per_param * d_in * d_out - cost(2, 8) - cost(32, 3)
    return [(2, 8), (32, 3), (max(1, int(left // cost(1, 2))), 2)]


def random_delta(shapes: dict[str, tuple[int, ...]], fingerprint: str, seed: int,
                 bits_per_param: float = 1.0) -> DeltaFile:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        d_out, d_in = shape
        tiers = []
        for rank, bits in deltacome_tiers(d_out, d_in, bits_per_param):
            def planes(d: int) -> torch.Tensor:
                return torch.randint(-2**31, 2**31 - 1, (bits, rank, num_words(d)), generator=g, dtype=torch.int64
                                     ).to(torch.int32)
            tiers.append(QuantTier(bits, rank, planes(d_out), torch.rand(rank, num_groups(d_out, G), generator=g).half() * 1e-2,
                                   planes(d_in), torch.rand(rank, num_groups(d_in, G), generator=g).half() * 1e-2,
                                   torch.rand(rank, generator=g)))
        weights[name] = LowRankDelta(tuple(shape), tiers)
    return DeltaFile({"method": "deltacome", "base_fingerprint": fingerprint, "group_size": G}, weights)


def decode_rate(engine: LLMEngine, batch: int, tenants: int, steps: int, prompt_len: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch * 1000 + tenants)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, params, i % tenants if tenants else -1)
    started: set[str] = set()
    while len(started) < batch:                 # prefill (chunked) until every request has its first token
        started.update(o.request_id for o in engine.step())
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - t0
    for i in range(batch):
        engine.abort(f"r{i}")
    return batch * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "llama2-7b"], default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--tenants", default="0,1,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltaserve_bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tenants = [int(t) for t in args.tenants.split(",")]
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    path = default_model_path() if args.model == "smollm2" else random_7b(args.work / "llama2-7b-random", args.device)
    engine = LLMEngine(EngineConfig(str(path), device=args.device, dtype=dtype, max_slots=max(max(tenants), 1),
                                    max_num_seqs=max(batches), max_model_len=args.prompt_len + args.steps + 8))
    for slot in range(max(tenants)):
        engine.load_delta(slot, random_delta(engine.base_shapes, engine.base_fingerprint, seed=slot))
    vocab = engine.runner.model.config.vocab_size
    decode_rate(engine, 1, 0, 2, 8, vocab)      # warm-up
    rows = []
    for b in batches:
        for t in tenants:
            if t <= b:
                rate = decode_rate(engine, b, t, args.steps, args.prompt_len, vocab)
                rows.append({"batch": b, "tenants": t, "decode_tok_s": round(rate, 1)})
                print(json.dumps(rows[-1]), flush=True)
    stats = engine.stats()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"model": args.model, "device": device, "dtype": dtype, "steps": args.steps,
              "prompt_len": args.prompt_len, "kv_blocks": stats.kv_blocks_total,
              "delta_slot_bytes": stats.delta_slot_bytes, "backbone_bytes": stats.backbone_bytes, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_decode_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Engine decode, {args.model} on {device} ({dtype})", "", "| batch | tenants | decode tok/s |",
             "|---:|---:|---:|"] + [f"| {r['batch']} | {r['tenants']} | {r['decode_tok_s']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
