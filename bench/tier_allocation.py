"""Choose deltacome's default tier allocation by measurement: every candidate at equal bytes.

Synthetic deltas D = U diag(s) V^T (random orthonormal U, V) with spectra like real fine-tune deltas,
which fall off like a power law with a long tail (Delta-CoMe, Fig. 1):
    power-0.5   s_k = (k+1)^-0.5        heavy tail: a small rank holds little of the energy
    power-0.75  s_k = (k+1)^-0.75
    power-1.0   s_k = (k+1)^-1.0        fast decay: the top ranks dominate
    spike+tail  s_k = (k+1)^-0.6 + 4 (k+1)^-1 for k < 8   a few dominant directions over a heavy tail
Shapes: 1024x1024 (attention-like) and 1024x2816 (MLP-like, the 4096x11008 aspect ratio of Llama-2-7B).
Metric: relative Frobenius error ||D - D_hat|| / ||D|| at 1.0 bit per parameter, every byte counted.
svd (FP16 low rank) and bitdelta are measured at the same budget for reference.

Writes bench/results/tier_allocation.json and .md.  Run: python bench/tier_allocation.py
"""

import argparse
import json
import time
from pathlib import Path

import torch

from deltaserve.delta_store.allocation import AdaptivePlan, TierPlan, parse_plan
from deltaserve.delta_store.format import weight_bytes
from deltaserve.delta_store.methods import MethodOptions, compress_weight

SHAPES = [(1024, 1024), (1024, 2816)]
CANDIDATES = [
    "8:0.008,3:0.047,2:0.945",  # Delta-CoMe's released 7B setting (2@8, 32@3, 968@2) as byte shares
    "8:0.02,3:0.1,2:0.88",
    "8:0.1,4:0.3,3:0.6",
    "2:1",
    "3:1",
    "4:1",
    "auto:8/3/2",
    "auto:8/4/3/2",
    "auto:8/6/4/3/2",
    "auto:8/7/6/5/4/3/2/1",
]
# The engine runs one shrink/expand pair per tier, so among near-equal allocations fewer tiers win.
MAX_DEFAULT_TIERS = 4


def max_tiers(plan: TierPlan | AdaptivePlan) -> int:
    return len(plan.bits) if isinstance(plan, TierPlan) else len(plan.choices)


def spectrum(kind: str, n: int) -> torch.Tensor:
    k = torch.arange(1, n + 1, dtype=torch.float32)
    if kind.startswith("power-"):
        return k ** -float(kind.removeprefix("power-"))
    spike = torch.where(k <= 8, 4 / k, torch.zeros_like(k))
    return k**-0.6 + spike


SPECTRA = ["power-0.5", "power-0.75", "power-1.0", "spike+tail"]


def synthetic_delta(shape: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=gen))
    return (u * spectrum(kind, n)) @ v.T


def measure(delta: torch.Tensor, options: MethodOptions) -> dict:
    start = time.perf_counter()
    stored = compress_weight(delta, options, None)
    seconds = time.perf_counter() - start
    recon = stored.to_dense(options.group_size)
    tiers = [f"{t.rank}@{t.bits}" for t in getattr(stored, "tiers", [])]
    return {
        "error": float((recon - delta).norm() / delta.norm()),
        "bits_per_param": 8 * weight_bytes(stored) / delta.numel(),
        "tiers": " + ".join(tiers),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits-per-param", type=float, default=1.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tier_allocation"))
    args = parser.parse_args()
    rows = []
    for s_index, kind in enumerate(SPECTRA):
        for shape in SHAPES:
            delta = synthetic_delta(shape, kind, seed=s_index)
            runs = [("deltacome " + c, MethodOptions("deltacome", args.bits_per_param, plan=parse_plan(c))) for c in CANDIDATES]
            runs += [(m, MethodOptions(m, args.bits_per_param)) for m in ("svd", "bitdelta")]
            for name, options in runs:
                result = measure(delta, options) | {"candidate": name, "spectrum": kind, "shape": list(shape)}
                rows.append(result)
                print(f"{kind:11} {shape} {name:34} err {result['error']:.4f} "
                      f"{result['bits_per_param']:.3f} b/p  {result['tiers']}", flush=True)
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    mean = {n: sum(r["error"] for r in rows if r["candidate"] == n) / (len(SPECTRA) * len(SHAPES)) for n in names}
    eligible = [f"deltacome {c}" for c in CANDIDATES if max_tiers(parse_plan(c)) <= MAX_DEFAULT_TIERS]
    chosen = min(eligible, key=mean.get)
    summary = {"bits_per_param": args.bits_per_param, "spectra": SPECTRA, "shapes": SHAPES,
               "mean_error": mean, "chosen": chosen, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(markdown(summary, names))
    print(f"chosen default: {chosen}")


def markdown(summary: dict, names: list[str]) -> str:
    cols = [(kind, tuple(shape)) for kind in summary["spectra"] for shape in summary["shapes"]]
    head = "| candidate | " + " | ".join(f"{k} {s[0]}x{s[1]}" for k, s in cols) + " | mean |"
    lines = [
        f"# deltacome tier allocation at {summary['bits_per_param']} bits/param (relative Frobenius error, lower is better)",
        "",
        "Produced by `bench/tier_allocation.py` (spectra and shapes documented there). Every stored byte counts.",
        "",
        head,
        "|" + "---|" * (len(cols) + 2),
    ]
    for name in names:
        errs = {(r["spectrum"], tuple(r["shape"])): r["error"] for r in summary["rows"] if r["candidate"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{errs[c]:.4f}" for c in cols) + f" | {summary['mean_error'][name]:.4f} |")
    lines += ["", f"Chosen default (lowest mean error with at most {MAX_DEFAULT_TIERS} tiers): **{summary['chosen']}**", "",
              "Tiers picked by the chosen allocation (rank@bits):", ""]
    for r in summary["rows"]:
        if r["candidate"] == summary["chosen"]:
            lines.append(f"- {r['spectrum']} {r['shape'][0]}x{r['shape'][1]}: {r['tiers']} "
                         f"({r['bits_per_param']:.3f} bits/param)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
