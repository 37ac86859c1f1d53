"""``deltaserve serve``: from a config file, or config-less the way vLLM users start a server::

    deltaserve serve --config configs/default.yaml --port 8000
    deltaserve serve --model ./Llama-2-7b-hf --tenant math=math.safetensors --device cuda --dtype float16

Flags given next to ``--config`` override the file. Both paths build the same raw document and go
through the same validation (server.config), so they cannot accept different things.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server",
                              description="Run the OpenAI-compatible multi-tenant server.")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--model", help="base model: a Hugging Face folder, a .gguf file, or 'default' (embedded SmolLM2)")
    p.add_argument("--tenant", action="append", default=[], metavar="NAME=DELTA_FILE",
                   help="register a tenant from a compressed delta at start-up (repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-slots", type=int, help="tenants resident on the device at once")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens per request")
    p.add_argument("--served-model-name", help="the base model's id in the API (default: its file or folder name)")
    p.add_argument("--store-dir", help="registry folder (SQLite + delta files)")
    p.add_argument("--admin-key", help="key for /admin and adapter loading (default: $DELTASERVE_ADMIN_KEY)")
    p.add_argument("--require-api-key", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse inference requests without a key (config-less default: no)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def raw_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config document the flags describe (a file's, with the flags laid over it)."""
    from .config import ConfigError, read_yaml

    if args.config:
        raw = read_yaml(args.config)
    elif args.model:
        raw = {"server": {"require_api_key": False}}
    else:
        raise ConfigError("serve: give --config FILE or --model DIR_OR_GGUF")
    sections = {name: dict(raw.get(name) or {}) for name in ("engine", "server", "store")}
    overrides = {
        ("engine", "model"): args.model, ("engine", "device"): args.device, ("engine", "dtype"): args.dtype,
        ("engine", "max_slots"): args.max_slots, ("engine", "max_model_len"): args.max_model_len,
        ("store", "root"): args.store_dir, ("server", "served_model_name"): args.served_model_name,
        ("server", "admin_key"): args.admin_key,
        ("server", "require_api_key"): args.require_api_key, ("server", "host"): args.host,
        ("server", "port"): args.port,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            sections[section][key] = value
    tenants = list(raw.get("tenants") or [])
    for spec in args.tenant:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--tenant {spec!r}: expected NAME=DELTA_FILE")
        tenants.append({"name": name, "delta": path})
    return {**raw, **sections, "tenants": tenants}


def run(args: argparse.Namespace) -> int:
    # Imported here: they pull in torch and the engine, which `deltaserve --help` should not wait for.
    import uvicorn

    from .app import create_app
    from .config import ConfigError, config_from_dict

    try:
        config = config_from_dict(raw_config(args))
    except (ConfigError, ValueError) as exc:
        print(f"deltaserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The event loop, the engine's step thread and the delta tiers' disk-read threads share one GIL, and a
    # thread coming back from a torch call waits up to one switch interval for a busy holder. Reading and
    # loading a delta are thousands of such calls: beside a thread spinning in Python, one SmolLM2 delta load
    # took 85 s at Python's 5 ms and 11 s at 1 ms (CPU, bench/results/load_contention.md).
    sys.setswitchinterval(0.001)
    uvicorn.run(create_app(config), host=config.server.host, port=config.server.port, log_level=args.log_level)
    return 0
