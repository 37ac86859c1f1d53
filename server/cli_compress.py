"""`deltaserve compress`: base + fine-tune -> one compressed delta file (progress bar per weight)."""

import argparse
import sys

METHOD_HELP = "deltacome (default), bitdelta, svd or dense"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="compress a fine-tune into a delta file",
                              description="Compress fine-tune - base into one .safetensors delta file.")
    p.add_argument("--base", required=True, help="base model: Hugging Face folder or .gguf file")
    p.add_argument("--finetuned", required=True, help="fine-tuned model: Hugging Face folder")
    p.add_argument("--out", required=True, help="delta file to write (.safetensors)")
    p.add_argument("--method", default="deltacome", help=METHOD_HELP)
    p.add_argument("--bits-per-param", type=float, default=1.0,
                   help="budget per 2-D weight counting every stored byte (default 1.0 = 1/16 of FP16)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size, a multiple of 32")
    p.add_argument("--tiers", default="auto",
                   help="deltacome bit allocation: auto (per-matrix, default), auto:8/4/3/2, or 8:0.02,3:0.1,2:0.88")
    p.add_argument("--calibration", help="text file: calibrate the deltacome quantizer on the base's activations")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deltaserve.delta_store import compress, load_delta
    from deltaserve.delta_store.allocation import parse_plan

    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="weight", desc="compress", file=sys.stderr)
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    try:
        path = compress(args.base, args.finetuned, args.out, method=args.method, bits_per_param=args.bits_per_param,
                        group_size=args.group_size, calibration=args.calibration, device=args.device,
                        progress=progress, tiers=parse_plan(args.tiers))
    except (ValueError, OSError) as exc:
        print(f"deltaserve compress: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    meta = load_delta(path).metadata
    print(f"wrote {path}: {len(meta['weights'])} weights, {meta['total_bytes']} bytes, "
          f"{meta['bits_per_param']:.4f} bits/param on 2-D weights ({meta['method']})")
    return 0
