"""Request-level serving benchmark: `deltaserve serve` under Poisson load over many Zipf-popular tenants.

Starts the real server (subprocess, loopback), registers N tenants through the admin API from random
packed Delta-CoMe deltas (a small pool of distinct files shared by all tenants), warms up, measures
cold-tenant loads from disk / host memory / GPU one request at a time, then drives an open-loop load with
the openai client (streamed chat, fixed prompt and max_tokens, ignore_eos). Writes
<out>/serve_load_<model>_<N>t.{json,md} (+ .png with matplotlib).

Usage (GPU; each command fits the device's 10-minute call; var/ keeps the model, deltas and registered store
between calls on a warm machine, and a rerun registers only missing tenants; registering the 1000 SmolLM2
tenants took 304 s on the H100 machine, so run it alone with --setup-only first):
  python bench/serve_load.py --model smollm2 --device cuda --tenants 1000 --max-slots 16 --host-bytes 4GiB \
      --rate 4 --requests 400 --duration 100 --drain 90 --max-tokens 32 --out bench/results
  python bench/serve_load.py --model llama2-7b --device cuda --tenants 100 --bits-per-param 0.5 --delta-pool 2 \
      --max-slots 16 --host-bytes 16GiB --setup-only   # 13.5 GB model + 100 x 0.42 GB store: ~57 GB of disk
  python bench/serve_load.py --model llama2-7b --device cuda --tenants 100 --bits-per-param 0.5 --delta-pool 2 \
      --max-slots 16 --host-bytes 16GiB --rate 1 --requests 120 --duration 100 --drain 120 --max-tokens 32 \
      --out bench/results
CPU smoke (about a minute): python bench/serve_load.py --model tiny --tenants 50 --max-slots 2 --rate 1 \
      --requests 40 --max-tokens 16 --host-bytes 64MiB --delta-pool 4
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from deltaserve.delta_store.checkpoint import default_model_path, open_checkpoint
from random_models import random_7b
from load_schedule import make_schedule
from serve_client import RequestShape, run_schedule, single
from serve_cold import cold_probes, probe_plan
from serve_process import ServerProcess, ServerSpec
from serve_report import graph_summary, load_summary, tier_summary, write
from serve_tenants import delta_pool, register

REPO = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class LoadConfig:
    model: str = "smollm2"          # smollm2 | llama2-7b (random, made in --work) | tiny (random, CPU smoke) | a path
    device: str = "cpu"
    dtype: str | None = None        # default: bfloat16 on cuda, float32 on cpu
    tenants: int = 1000
    max_slots: int = 8
    host_bytes: str = "2GiB"
    bits_per_param: float = 1.0
    delta_pool: int = 8             # distinct delta files; tenant i uploads file i % pool
    rate: float = 4.0               # requests/s (Poisson)
    zipf: float = 1.0
    requests: int = 400
    duration: float = 120.0         # no arrival later than this (s)
    drain: float = 120.0            # after the last arrival, wait this long for stragglers (s)
    prompt_words: int = 64
    max_tokens: int = 64
    max_num_seqs: int = 64
    exact_graph_after: int = 1      # the engine's; 1 (its default): every tenant mix its own graph at once
    cold_probes: int = 3            # host-tier probes; disk probes = max_slots + this
    seed: int = 0
    timeout: float = 600.0          # per request (s)
    setup_only: bool = False        # make the model, deltas and registered store, then stop (a later run reuses them)
    work: Path = Path("var/serve_load")
    out: Path = Path("var/serve_load/out")

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.tenants < 1 or self.max_slots < 1 or self.delta_pool < 1 or self.rate <= 0:
            raise ValueError("tenants, max_slots, delta_pool must be >= 1 and rate > 0")


def resolve_model(config: LoadConfig) -> tuple[str, str]:
    """(path, short name for files and titles)."""
    if config.model == "smollm2":
        return str(default_model_path()), "smollm2"
    if config.model == "llama2-7b":
        path = random_7b(config.work / "llama2-7b-random", config.device)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the weights were drawn on the GPU: leave its memory to the server
        return str(path), "llama2-7b"
    if config.model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import make_tiny_model  # the tests' random model, not a twin of it
        folder = config.work / "tiny-model"
        if not (folder / "config.json").exists():
            # Wider than the tests' default: Delta-CoMe's fixed 2@8 + 32@3 bit tiers need d >= 256 to fit ~1 bit/param.
            make_tiny_model(folder, hidden_size=256, intermediate_size=512)
        return str(folder), "tiny"
    return config.model, Path(config.model).stem


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def chat_messages(words: int) -> list[dict]:
    # A system message of our own: SmolLM2's template otherwise adds its default one naming "SmolLM", whose
    # token is past the random 7B model's 32000-token vocabulary (it borrows SmolLM2's tokenizer).
    head = "Summarize the following notes about the inventory of the warehouse in one paragraph."
    filler = "item crate pallet shelf order count stock label".split()
    user = " ".join([head] + [filler[i % len(filler)] for i in range(max(0, words - len(head.split())))])
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]


def check_prompt(model_path: str, messages: list[dict]) -> int:
    """The prompt's token count; refuses a prompt with ids the model's embedding does not have."""
    checkpoint = open_checkpoint(model_path)
    ids = checkpoint.tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    if max(ids) >= checkpoint.config.vocab_size:
        raise ValueError(f"the prompt has token id {max(ids)} >= the model's vocabulary {checkpoint.config.vocab_size}")
    return len(ids)


def run(config: LoadConfig, command: str) -> list[Path]:
    model_path, model_tag = resolve_model(config)
    pool = delta_pool(model_path, config.work / "deltas", config.delta_pool, config.bits_per_param)
    store = config.work / f"store-{model_tag}-{config.bits_per_param:g}bpp"
    shape = RequestShape(chat_messages(config.prompt_words), config.max_tokens)
    prompt_tokens = check_prompt(model_path, shape.messages)
    spec = ServerSpec(model=model_path, device=config.device, dtype=config.dtype, max_slots=config.max_slots,
                      host_bytes=config.host_bytes, store=store, admin_key=secrets.token_hex(16),
                      max_model_len=prompt_tokens + config.max_tokens + 64,
                      max_num_seqs=config.max_num_seqs, exact_graph_after=config.exact_graph_after)
    schedule = make_schedule(config.requests, config.rate, config.tenants, config.zipf, config.duration, config.seed)
    config.work.mkdir(parents=True, exist_ok=True)
    with ServerProcess(spec, config.work / "server.log") as server:
        t = time.perf_counter()
        uploaded = asyncio.run(register(server.url, spec.admin_key, store, config.tenants, pool))
        register_s = time.perf_counter() - t
        print(f"registered {uploaded} new tenants ({config.tenants} in all) in {register_s:.1f} s", flush=True)
        if config.setup_only:
            return []
        asyncio.run(single(server.url, 0, RequestShape(shape.messages, 4), config.timeout))  # warm-up (compile, alloc)
        plan = probe_plan(config.tenants, config.max_slots, config.cold_probes, {a.tenant for a in schedule})
        cold = cold_probes(server, store, plan, RequestShape(shape.messages, 1), config.timeout)
        print(f"cold probes: {len(plan)} done", flush=True)
        before = server.metrics()
        results, wall = asyncio.run(run_schedule(server.url, schedule, shape, config.drain, config.timeout))
        after = server.metrics()
        tiers, graphs = tier_summary(before, after), graph_summary(before, after)
    print(f"server stopped (exit code {server.exit_code})", flush=True)
    result = {
        "command": command, "device": device_name(config.device), "model_name": model_tag, "model_path": model_path,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
                   if k not in ("work", "out", "model")},
        "tenants": {"registered": config.tenants, "uploaded_this_run": uploaded, "register_s": register_s,
                    "distinct_delta_files": len(pool), "delta_file_bytes": pool[0].stat().st_size,
                    "store_bytes": sum(p.stat().st_size for p in store.rglob("*.safetensors"))},
        "load": load_summary(results, wall), "tiers_during_load": tiers, "graphs_during_load": graphs, "cold": cold,
        "server_exit_code": server.exit_code,
    }
    return write(result, results, config.out / f"serve_load_{model_tag}_{config.tenants}t")


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(LoadConfig):  # the dataclass's defaults, not an instance's (dtype is resolved per device)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(f.default) if f.default is not None else str, default=f.default)
    return LoadConfig(**vars(ap.parse_args(argv)))


def main() -> None:
    config = parse_args()
    command = "python bench/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in run(config, command):
        print(path)


if __name__ == "__main__":
    main()
