"""Outputs of bench/serve.py: serve.json (everything), serve.md (targets, capacity and throughput tables) and
serve.png / serve_bandwidth.png (matplotlib, when importable)."""
from __future__ import annotations

import json
from pathlib import Path

OURS, BASE, TORCH, BITDELTA, MERGED = ("deltaserve (Triton)", "backbone alone", "PyTorch delta path",
                                       "bitdelta (Triton sign kernel)", "merged-model swapping")
SYSTEMS = (OURS, BASE, TORCH, BITDELTA, MERGED)
CAPACITY_TARGETS = {1.0: 64, 0.5: 128}
BW_TARGET = 0.75


def setup_notes(args, model: str, dtype: str) -> list[str]:
    """The Setup section: what the backbone, the deltas and each system are."""
    covered = ("the transformer blocks' linear layers plus embed_tokens and lm_head" if args.with_embeddings else
               "the transformer blocks' linear layers (embed_tokens and lm_head unchanged, as BitDelta and Delta-CoMe "
               "compress them)")
    return [
        f"Backbone: {model} weights, random and seeded (bench/random_models.py), {dtype} on the device. Time "
        "depends on shapes and bit-widths, not values.",
        f"Deltas cover {covered}. Delta-CoMe deltas: random packed bit planes and scales whose tier shapes (ranks "
        "and bits per matrix) are Delta-CoMe's allocation sized to the budget by random_models.deltacome_tiers: 2 "
        "ranks at 8 bits, 32 at 3, the rest at 2, every code, fp16 group scale and fp32 singular value counted. "
        "Compressing real 7B deltas with our compressor does not fit the run's time limit; quality on real "
        "fine-tunes is in bench/results/quality.md. BitDelta deltas: random sign bits and one fp32 scale per matrix.",
        "One delta file per method is loaded into every slot: each slot holds its own copy, so the kernels read "
        "distinct bytes for every tenant.",
        f"Merged-model swapping: one pinned host copy of the backbone's parameters stands in for every tenant's "
        f"merged FP16 model; {args.swap_steps} tokens per residency; measured by whole rounds (copies + decode "
        f"steps) up to {args.swap_direct_max} tenants, derived above from the median measured swap and measured "
        "step times (marked derived); one tenant never swaps (marked resident: the backbone's rate).",
        "Fraction of the bandwidth bound: (all backbone parameters + distinct tenants' delta bytes + K/V bytes at "
        "the timed steps' mean context) / measured copy bandwidth / measured step time.",
        f"PyTorch delta path: an engine with delta_kernels=False and no CUDA graphs, tenants {args.torch_tenants} "
        f"only, {args.torch_steps} timed steps, points past its {args.torch_budget:.0f} s budget marked skipped.",
        "Every clock covers decode steps only (after each request's prefill); the merged rounds add the copies."]


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def find(rows: list[dict], system: str, batch: int, tenants: int) -> dict | None:
    want = 0 if system == BASE else tenants
    return next((r for r in rows if r["system"] == system and r["batch"] == batch and r["tenants"] == want), None)


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("tok_s") is None:
        return r.get("kind", "skipped")
    mark = {"derived": " (derived)", "resident": " (resident)"}.get(r.get("kind"), "")
    return f"{r['tok_s']:,.1f}{mark}"


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not a.get("tok_s") or not b.get("tok_s"):
        return "-"
    return f"{a['tok_s'] / b['tok_s']:.2f}"


def target_rows(res: dict) -> list[str]:
    out = ["| target | measured | |", "|---|---|---|"]
    for cap in res.get("capacity", []):
        want = CAPACITY_TARGETS.get(cap["bits_per_param"])
        if want is not None:
            met = "met" if cap["slots"] >= want else "missed"
            out.append(f"| >= {want} tenants at {cap['bits_per_param']} bit/param, KV for {cap.get('kv_reserved')} "
                       f"{'(Delta-CoMe: 50 on an 80 GB A100) ' * (want == 64)}| {cap['slots']} | {met} |")
    fracs = [r for r in res["rows"] if r["system"] == OURS and r.get("bw_fraction") is not None]
    if fracs:
        lo, hi = min(fracs, key=lambda r: r["bw_fraction"]), max(fracs, key=lambda r: r["bw_fraction"])
        met = sum(r["bw_fraction"] >= BW_TARGET for r in fracs)
        out.append(f"| >= {BW_TARGET} of the bandwidth bound, deltaserve decode steps | {hi['bw_fraction']:.3f} best "
                   f"(batch {hi['batch']}, {hi['tenants']} tenants), {lo['bw_fraction']:.3f} worst (batch "
                   f"{lo['batch']}, {lo['tenants']} tenants); {met} of {len(fracs)} points reach it "
                   f"| {'met' if met == len(fracs) else 'missed'} |")
    return out


def capacity_rows(res: dict) -> list[str]:
    out = ["| bits/param | tenants resident | backbone GB | one slot GB | KV GB | free after fill GB | "
           "probe decode step ms | planned from | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res.get("capacity", []):
        if c.get("skipped"):
            out.append(f"| {c['bits_per_param']} | skipped ({c['skipped']}) |" + " |" * 7)
            continue
        out.append(f"| {c['bits_per_param']} (delta {c['delta_bits_per_param']:.3f}) | {c['slots']} | "
                   f"{gb(c.get('backbone_bytes'))} | {gb(c.get('slot_bytes'))} | {gb(c.get('kv_bytes'))} | "
                   f"{gb(c.get('free_after_bytes'))} | {c.get('probe_step_ms', '-')} | {c['planned_slots']} planned: "
                   f"{c['arithmetic']} | {'; '.join(c.get('notes', [])) or '-'} |")
    return out


def capacity_why(res: dict) -> list[str]:
    """For each capacity target: the memory it would need against the device's."""
    out = []
    for c in res.get("capacity", []):
        want = CAPACITY_TARGETS.get(c["bits_per_param"])
        if want is None or not c.get("slot_bytes"):
            continue
        need = c["backbone_bytes"] + c["kv_reserved_bytes"] + want * c["slot_bytes"]
        out.append(f"- {want} tenants at {c['bits_per_param']} bit/param need {gb(c['backbone_bytes'])} GB backbone + "
                   f"{gb(c['kv_reserved_bytes'])} GB KV + {want} x {gb(c['slot_bytes'])} GB = {gb(need)} GB, before "
                   f"activations and the CUDA context; the device has {gb(res['device_memory_bytes'])} GB: "
                   f"{c['slots']} fit.")
    return out


def throughput_rows(res: dict) -> list[str]:
    rows = res["rows"]
    head = ["batch", "tenants", *SYSTEMS, "ours / backbone", "ours / merged", "fraction of BW bound (ours)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b, t in res["points"]:
        ours = find(rows, OURS, b, t)
        frac = ours.get("bw_fraction") if ours else None
        cells = [cell(find(rows, s, b, t)) for s in SYSTEMS]
        out.append(f"| {b} | {t} | " + " | ".join(cells) + f" | {ratio(ours, find(rows, BASE, b, t))} | "
                   f"{ratio(ours, find(rows, MERGED, b, t))} | {'-' if frac is None else f'{frac:.3f}'} |")
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Serving benchmark: {res['model']} on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}, {res['dtype']}; copy bandwidth measured in the same run "
             f"{res['copy_bandwidth_gbs']:.0f} GB/s (read + write of a 1 GiB device copy). Command: "
             f"`{res['command']}` ({res['elapsed_s']:.0f} s{'' if res['complete'] else ', INCOMPLETE: cut short'}).",
             "", "## Targets", "", *target_rows(res), "", "## Setup", ""]
    lines += [f"- {n}" for n in res["notes"]]
    if res.get("skipped_phases"):
        lines.append(f"- Phases skipped past the time budget: {', '.join(res['skipped_phases'])}.")
    lines += ["", "## Capacity", "", *capacity_rows(res), "", *capacity_why(res), "",
              "## Decode throughput (tokens/s)", "",
              f"Prompt {res['prompt_len']} tokens; {res['warmup']} warm-up then {res['steps']} timed decode steps per "
              f"point ({res['torch_steps']} for the PyTorch path); the clock covers decode steps only. Row i of a "
              "batch uses tenant i % tenants.", "", *throughput_rows(res), ""]
    path.write_text("\n".join(lines))


def plot(res: dict, out: Path) -> list[str]:
    """serve.png (tokens/s vs batch, one panel per tenant count) and serve_bandwidth.png; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plots", flush=True)
        return []
    tenants = sorted({t for _, t in res["points"]})
    batches = sorted({b for b, _ in res["points"]})
    colors = dict(zip(SYSTEMS, ("C3", "k", "C1", "C0", "C2")))
    fig, axes = plt.subplots(1, len(tenants), figsize=(3.6 * len(tenants) + 1.5, 3.6), squeeze=False)
    for ax, t in zip(axes[0], tenants):
        for s in SYSTEMS:
            pts = [(b, find(res["rows"], s, b, t)) for b, tt in res["points"] if tt == t]
            pts = [(b, r["tok_s"]) for b, r in pts if r and r.get("tok_s")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s, color=colors[s], ls="--" if s == BASE else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(xlabel="batch", title=f"{t} tenant{'s' * (t > 1)}")
    axes[0][0].set_ylabel("decode tokens/s")
    handles = [plt.Line2D([], [], color=colors[s], marker="o", ls="--" if s == BASE else "-") for s in SYSTEMS]
    fig.legend(handles, SYSTEMS, loc="center right", fontsize=7)
    fig.suptitle(f"{res['model']} decode throughput, {res['device']}")
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.6 * len(tenants) + 1.5), 1))
    fig.savefig(out / "serve.png", dpi=110)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for t in tenants:
        pts = [(r["batch"], r["bw_fraction"]) for r in res["rows"]
               if r["system"] == OURS and r["tenants"] == t and r.get("bw_fraction") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{t} tenants")
    ax.axhline(BW_TARGET, ls="--", c="gray", label="target")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(xlabel="batch", ylabel="fraction of the bandwidth bound", title="deltaserve decode steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "serve_bandwidth.png", dpi=110)
    plt.close("all")
    return ["serve.png", "serve_bandwidth.png"]


def write_all(res: dict, out: Path, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        res["plots"] = plot(res, out)
    (out / "serve.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "serve.md")
