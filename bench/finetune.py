"""Full fine-tunes of the embedded SmolLM2-135M-Instruct on the generated tasks of bench/tasks.py (GPU).

Usage: python bench/finetune.py --base SmolLM2.gguf --task arithmetic --out runs/arithmetic [--steps 400]

The fine-tune trains every linear layer and norm; the token embedding (tied to the LM head) stays frozen,
as in most instruction fine-tunes of small models, which keeps the demo tenants' deltas small. Loss is on the
answer tokens only. FP32 master weights with BF16 autocast, AdamW, cosine schedule, fixed seed.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tasks import TASKS


def load_base(path: Path, device: str, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a Hugging Face folder or a GGUF file."""
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    # GGUF weights arrive dequantized; drop the GGUF quantizer so the fine-tune saves as plain safetensors.
    model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:  # batched generation pads on the left; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def chat_exchange(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> str:
    """The whole exchange as the chat template renders it, so the answer ends with the template's end of turn."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template puts right after an assistant answer: generation stops there."""
    prompt, answer = chat_prompt(tokenizer, "?"), "x"
    suffix = chat_exchange(tokenizer, "?", answer)[len(prompt) + len(answer):]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"][0]


def encode_examples(tokenizer: PreTrainedTokenizerBase, items: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of the whole exchange, and where the answer starts (loss is taken from there on)."""
    encoded = []
    for question, answer in items:
        prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        ids = tokenizer(chat_exchange(tokenizer, question, answer), add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders the prompt differently inside the exchange")
        encoded.append((ids, len(prompt_ids)))
    return encoded


def batch_tensors(examples: list[tuple[list[int], int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, answer_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, answer_start : len(ids)] = torch.tensor(ids[answer_start:])
    return input_ids.to(device), labels.to(device)


def finetune(base: Path, task_name: str, out: Path, steps: int, batch_size: int, lr: float, n_train: int, seed: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_base(base, device)
    model.config.use_cache = False
    for name, param in model.named_parameters():
        param.requires_grad = "embed_tokens" not in name and "lm_head" not in name
    train_items, _ = TASKS[task_name].split(n_train, 0, seed)
    examples = encode_examples(tokenizer, train_items)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    started, losses = time.time(), []
    for step in range(steps):
        batch = random.sample(examples, batch_size)
        input_ids, labels = batch_tensors(batch, tokenizer.pad_token_id or 0, device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            # Padding sits after every answer and is causal-masked away from it, so no attention mask is needed.
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log = {"task": task_name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": n_train,
           "first_loss": sum(losses[:10]) / 10, "last_loss": sum(losses[-10:]) / 10, "seconds": time.time() - started}
    (out / "finetune.json").write_text(json.dumps(log, indent=2))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(finetune(args.base, args.task, args.out, args.steps, args.batch_size, args.lr, args.n_train, args.seed)))


if __name__ == "__main__":
    main()
