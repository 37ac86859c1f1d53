"""Side-by-side table of two bench/kernel_bench.py runs of one device call (an A/B of a kernel or config change).

Usage: python bench/compare_kernel_runs.py BEFORE/kernels.json AFTER/kernels.json --title "..." --out results/ab.md
Per decode case: both runs' kernel time (CUDA graph replay) and fraction of copy bandwidth, and before / after
(> 1: the change is faster), of the low-rank delta (default) or, with --kernel sign, of the BitDelta sign kernel; then the geometric mean, the range, and the whole 7B layer of both runs. Both files
must come from the same GPU, ideally the same call (each run measures its own copy bandwidth; both are shown).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


# kernel -> (its time, its fraction of copy bandwidth) in kernel_bench's decode rows
FIELDS = {"lowrank": ("kernel_us", "frac_copy_bw"), "sign": ("sign_us", "sign_frac_copy_bw")}


def compare(before: dict, after: dict, kernel: str = "lowrank") -> dict:
    time, bw = FIELDS[kernel]
    if before["device"] != after["device"]:
        raise SystemExit(f"runs on different GPUs: {before['device']} vs {after['device']}")
    key = lambda r: (r["shape"], r["batch"], r["tenants"])  # noqa: E731
    after_rows = {key(r): r for r in after["decode"]}
    rows = []
    for b in before["decode"]:
        a = after_rows.get(key(b))
        if a is None:
            continue
        rows.append(dict(shape=b["shape"], batch=b["batch"], tenants=b["tenants"], before_us=b[time],
                         after_us=a[time], before_bw=b[bw], after_bw=a[bw], speedup=b[time] / a[time]))
    if not rows:
        raise SystemExit("the runs share no decode case")
    speedups = [r["speedup"] for r in rows]
    layers = {name: run.get("layer") for name, run in (("before", before), ("after", after))}
    return dict(device=before["device"], copy_bw_gbs={"before": before["copy_bw_gbs"], "after": after["copy_bw_gbs"]},
                rows=rows, geomean=math.exp(sum(map(math.log, speedups)) / len(speedups)),
                min=min(speedups), max=max(speedups), layer=layers)


def markdown(res: dict, title: str, command: str) -> str:
    lines = [f"# A/B: {title} ({res['device']})", "", command, "",
             f"Copy bandwidth: {res['copy_bw_gbs']['before']:.0f} GB/s (before run), "
             f"{res['copy_bw_gbs']['after']:.0f} GB/s (after run). Kernel time in us (CUDA graph replay, L2 flushed); "
             "speedup = before / after.", "",
             "| shape | batch | tenants | before us | after us | speedup | before of copy BW | after of copy BW |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['tenants']} | {r['before_us']:.1f} | {r['after_us']:.1f} | "
                     f"{r['speedup']:.3f} | {100 * r['before_bw']:.1f}% | {100 * r['after_bw']:.1f}% |")
    lines += ["", f"Geometric mean speedup {res['geomean']:.3f} over {len(res['rows'])} cases "
                  f"(range {res['min']:.3f}-{res['max']:.3f})."]
    b, a = res["layer"]["before"], res["layer"]["after"]
    if b and a:
        lines.append(f"7B decode layer, batch {b['batch']}, {b['tenants']} tenants (CUDA graph): "
                     f"{b['layer_graph_us']:.0f} -> {a['layer_graph_us']:.0f} us "
                     f"({b['layer_graph_us'] / a['layer_graph_us']:.3f}x; {a['graph_ratio_to_floor']:.2f}x the "
                     f"bandwidth floor of {a['floor_us']:.0f} us after, {b['graph_ratio_to_floor']:.2f}x before).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--title", required=True)
    ap.add_argument("--command", default="", help="how the two runs were made (printed under the title)")
    ap.add_argument("--out", type=Path, required=True, help="the .md to write (a .json beside it)")
    ap.add_argument("--kernel", choices=sorted(FIELDS), default="lowrank", help="which kernel's times to compare")
    args = ap.parse_args()
    res = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()), args.kernel)
    args.out.write_text(markdown(res, args.title, args.command))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"geomean {res['geomean']:.3f} ({res['min']:.3f}-{res['max']:.3f})")


if __name__ == "__main__":
    main()
