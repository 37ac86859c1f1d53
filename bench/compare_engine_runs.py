"""Side-by-side table of two bench/engine_decode.py runs of one device call (an A/B of an engine change).

Usage: python bench/compare_engine_runs.py BEFORE.json AFTER.json --title "..." --command "..." --out results/ab.md
Per (batch, tenants) point both runs measured: decode tokens/s and after / before (> 1: the change is faster), then
the geometric mean and range, over all points and over the backbone-only points (tenants 0). Writes the .md and a
.json beside it. Both runs must come from one GPU, ideally one call.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def compare(before: dict, after: dict) -> dict:
    if before["device"] != after["device"] or before["dtype"] != after["dtype"]:
        raise SystemExit(f"runs differ in GPU or dtype: {before['device']} {before['dtype']} vs "
                         f"{after['device']} {after['dtype']}")
    after_rows = {(r["batch"], r["tenants"]): r["decode_tok_s"] for r in after["rows"]}
    rows = [dict(batch=r["batch"], tenants=r["tenants"], before=r["decode_tok_s"],
                 after=after_rows[(r["batch"], r["tenants"])],
                 speedup=after_rows[(r["batch"], r["tenants"])] / r["decode_tok_s"])
            for r in before["rows"] if (r["batch"], r["tenants"]) in after_rows]
    if not rows:
        raise SystemExit("the runs share no point")
    summary = {}
    for name, subset in (("all", rows), ("backbone", [r for r in rows if r["tenants"] == 0]),
                         ("tenants", [r for r in rows if r["tenants"] > 0])):
        if subset:
            speedups = [r["speedup"] for r in subset]
            summary[name] = dict(points=len(subset), geomean=_geomean(speedups), min=min(speedups), max=max(speedups))
    return dict(device=before["device"], dtype=before["dtype"], rows=rows, summary=summary)


def markdown(result: dict, title: str, command: str) -> str:
    lines = [f"# {title}", "", f"{result['device']}, {result['dtype']}, both runs in one device call. Command: "
             f"`{command}`", "", "| batch | tenants | before tok/s | after tok/s | after / before |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['tenants']} | {r['before']:,.1f} | {r['after']:,.1f} | {r['speedup']:.3f} |"
              for r in result["rows"]]
    lines.append("")
    for name, s in result["summary"].items():
        lines.append(f"- {name} ({s['points']} points): geometric mean {s['geomean']:.3f}x, range "
                     f"{s['min']:.3f}-{s['max']:.3f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--title", required=True)
    ap.add_argument("--command", required=True, help="the engine_decode command both runs used")
    ap.add_argument("--out", type=Path, required=True, help="the .md to write (a .json goes beside it)")
    args = ap.parse_args()
    result = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    args.out.write_text(markdown(result, args.title, args.command))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
