"""`deltaserve inspect FILE`: validate a delta file and show what it holds and what it costs."""

import argparse
import json
import sys

# The size claim is about matrices this large and larger (small ones pay relatively more scales).
LARGE_MATRIX = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="describe a delta file",
                              description="Validate a delta file and print method, base, ranks/bits and sizes.")
    p.add_argument("file", help="delta file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the file's metadata as JSON")
    p.set_defaults(func=run)


def _bits(nbytes: int, params: int) -> str:
    return f"{8 * nbytes / params:.4f}" if params else "n/a"


def describe(meta: dict) -> list[str]:
    source = meta.get("source", {})
    lines = [
        f"method: {meta['method']} (format version {meta['format_version']}, created {meta.get('created')})",
        f"base fingerprint: {meta['base_fingerprint']}",
        f"source: base={source.get('base')} finetuned={source.get('finetuned')} calibration={source.get('calibration')}",
        f"group size: {meta['group_size']}  config: {json.dumps(meta.get('method_config', {}))}",
        f"{'weight':<48} {'shape':>12} {'kind':>8} {'bytes':>10} {'bits/param':>10}  tiers (rank@bits)",
    ]
    large_bytes = large_params = 0
    for name, entry in meta["weights"].items():
        shape = entry["shape"]
        params = shape[0] * (shape[1] if len(shape) == 2 else 1)
        tiers = " + ".join(f"{t['rank']}@{t['bits']}" for t in entry.get("tiers", []))
        lines.append(f"{name:<48} {'x'.join(map(str, shape)):>12} {entry['kind']:>8} {entry['bytes']:>10} "
                     f"{_bits(entry['bytes'], params):>10}  {tiers}")
        if len(shape) == 2 and min(shape) >= LARGE_MATRIX:
            large_bytes += entry["bytes"]
            large_params += params
    lines += [
        f"weights: {len(meta['weights'])}  total bytes: {meta['total_bytes']}",
        f"bits/param, 2-D weights: {meta['bits_per_param']:.4f} (budget {meta['bits_per_param_budget']})",
        f"bits/param, matrices >= {LARGE_MATRIX}x{LARGE_MATRIX}: {_bits(large_bytes, large_params)}",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    from deltaserve.delta_store import load_delta

    try:
        meta = load_delta(args.file).metadata
    except ValueError as exc:
        print(f"deltaserve inspect: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2) if args.json else "\n".join(describe(meta)))
    return 0
