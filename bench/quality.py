"""Compression quality on real fine-tunes: accuracy of base, full fine-tune and each method at equal bytes (GPU).

Usage: python bench/quality.py --base SmolLM2.gguf --work /tmp/quality --out bench/results [--demo-dir DIR]

For every task of bench/tasks.py: fine-tune SmolLM2 (bench/finetune.py), compress the fine-tune with each
method through deltaserve's own compressor, merge base + reconstructed delta and score exact-match accuracy
on held-out items with greedy decoding. Writes quality.json and quality.md; with --demo-dir, also copies the
demo tenants' deltas (deltacome at 0.5 bit/param, small enough to commit) there. A task takes ~4.5 min of an H100,
so `--tasks NAME ...` runs some and merges their rows into the quality.json already in --out (each row stamped
with date, GPU and commit; --fresh starts over).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from deltaserve.delta_store import compress, load_delta
from finetune import chat_prompt, end_of_turn_id, finetune, load_base
from tasks import TASKS, exact_match

# (label, method, bits per parameter, use calibration text): 1.0 bit/param is 1/16 of an FP16 delta.
METHODS = [
    ("deltacome@1/16", "deltacome", 1.0, False),
    ("deltacome+gptq@1/16", "deltacome", 1.0, True),
    ("bitdelta@1/16", "bitdelta", 1.0, False),
    ("svd@1/16", "svd", 1.0, False),
    ("deltacome@1/32", "deltacome", 0.5, False),
]
DEMO_TENANTS = {"arithmetic": "calculator", "french_numbers": "french"}
DEMO_LABEL = "deltacome@1/32"


@torch.no_grad()
def accuracy(model, tokenizer, items: list[tuple[str, str]], max_new_tokens: int, label: str,
             batch_size: int = 128) -> float:
    tokenizer.padding_side = "left"
    stop = end_of_turn_id(tokenizer)
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        enc = tokenizer([chat_prompt(tokenizer, q) for q, _ in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(exact_match(text, answer) for text, (_, answer) in zip(texts, chunk))
        if start == 0:  # a few predictions in the log show what exact match compares
            print(f"  {label}: " + " | ".join(f"{t!r} vs {a!r}" for t, (_, a) in list(zip(texts, chunk))[:3]))
    return correct / len(items)


@torch.no_grad()
def add_delta(model, deltas: dict[str, torch.Tensor], sign: float) -> None:
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        params[name].add_(sign * delta.to(params[name].device, params[name].dtype))


def run_task(base: Path, task_name: str, work: Path, args) -> dict:
    task = TASKS[task_name]
    ft_dir = work / task_name / "finetuned"
    ft_log = finetune(base, task_name, ft_dir, args.steps, args.batch_size, args.lr, args.n_train, args.seed)
    train_items, eval_items = task.split(args.n_train, args.n_eval, args.seed)
    calibration = work / task_name / "calibration.txt"
    calibration.write_text("\n".join(q + " " + a for q, a in train_items[:256]))
    model, tokenizer = load_base(base, "cuda")
    result = {"task": task_name, "finetune": ft_log, "n_eval": len(eval_items), "run": run_stamp()}
    result["base"] = accuracy(model, tokenizer, eval_items, task.max_new_tokens, "base")
    finetuned, _ = load_base(ft_dir, "cuda")
    result["finetuned"] = accuracy(finetuned, tokenizer, eval_items, task.max_new_tokens, "finetuned")
    del finetuned
    gain = result["finetuned"] - result["base"]
    result["methods"] = {}
    for label, method, bits, calibrate in METHODS:
        out = work / task_name / f"{label.replace('/', '_').replace('@', '_')}.safetensors"
        started = time.time()
        compress(base, ft_dir, out, method=method, bits_per_param=bits, device="cuda",
                 calibration=calibration if calibrate else None)
        seconds = time.time() - started
        delta = load_delta(out)
        dense = delta.dense_deltas()
        add_delta(model, dense, +1.0)
        acc = accuracy(model, tokenizer, eval_items, task.max_new_tokens, label)
        add_delta(model, dense, -1.0)
        result["methods"][label] = {
            "accuracy": acc, "gain_kept": (acc - result["base"]) / gain if gain > 0 else None,
            "file_bytes": out.stat().st_size, "bits_per_param": delta.metadata.get("bits_per_param"),
            "compress_seconds": seconds,
        }
        if args.demo_dir and label == DEMO_LABEL and task_name in DEMO_TENANTS:
            args.demo_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, args.demo_dir / f"{DEMO_TENANTS[task_name]}.safetensors")
    return result


def run_stamp() -> dict:
    """When, where and from which commit (if the tree is a git checkout) a task's row was measured: rows of
    separate runs share one table."""
    try:
        # --dirty: the GPU machine's copy of the tree may carry an older commit's .git under newer files
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no .git there, or no git
        commit = "not a git checkout"
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": device_name(), "commit": commit}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def merged_results(previous: list[dict], new: dict) -> list[dict]:
    """`previous` with `new`'s task replaced or added, in TASKS order: one device call cannot fit every
    task (each is a fine-tune, five compressions and seven evaluations), so runs of a few tasks add up."""
    by_task = {r["task"]: r for r in previous} | {new["task"]: new}
    return [by_task[name] for name in TASKS if name in by_task]


def markdown(results: list[dict], device: str) -> str:
    labels = [label for label, *_ in METHODS]
    lines = [f"# Compression quality on real SmolLM2-135M fine-tunes ({device})", "",
             "Exact-match accuracy on held-out items (greedy); in brackets the share of the fine-tune's gain over the base kept.", "",
             "| task | base | fine-tune | " + " | ".join(labels) + " |", "|---" * (3 + len(labels)) + "|"]
    for r in results:
        cells = []
        for label in labels:
            m = r["methods"][label]
            kept = "n/a" if m["gain_kept"] is None else f"{100 * m['gain_kept']:.0f}%"
            cells.append(f"{100 * m['accuracy']:.1f} ({kept})")
        lines.append(f"| {r['task']} | {100 * r['base']:.1f} | {100 * r['finetuned']:.1f} | " + " | ".join(cells) + " |")
    kept_avg = {label: [r["methods"][label]["gain_kept"] for r in results if r["methods"][label]["gain_kept"] is not None]
                for label in labels}
    lines.append("| **mean gain kept** | | | " + " | ".join(
        f"{100 * sum(v) / len(v):.0f}%" if v else "n/a" for v in kept_avg.values()) + " |")
    runs: dict[str, list[str]] = {}
    for r in results:
        stamp = r.get("run")
        when = f"{stamp['date']} on {stamp['device']} (commit: {stamp['commit']})" if stamp else "an earlier run (not stamped)"
        runs.setdefault(when, []).append(r["task"])
    lines += ["", "Measured in: " + "; ".join(f"{', '.join(tasks)}: {when}" for when, tasks in runs.items()) + "."]
    lines += ["", "File sizes (bytes, whole delta file incl. every scale): " + "; ".join(
        f"{r['task']}: " + ", ".join(f"{label} {r['methods'][label]['file_bytes']:,}" for label in labels) for r in results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demo-dir", type=Path)
    parser.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--fresh", action="store_true", help="drop the rows of tasks not run now from quality.json")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "quality.json"
    results = json.loads(previous.read_text())["results"] if previous.exists() and not args.fresh else []
    for name in args.tasks:  # results are rewritten after every task, so a cut-off run keeps what it finished
        results = merged_results(results, run_task(args.base, name, args.work, args))
        (args.out / "quality.json").write_text(json.dumps({"device": device, "results": results}, indent=2))
        (args.out / "quality.md").write_text(markdown(results, device))
    print(markdown(results, device))


if __name__ == "__main__":
    main()
