"""Summaries of a serving run and its files: JSON (everything), Markdown (tables), PNG (when matplotlib is
installed; the plot is a convenience, the numbers are in the JSON)."""
from __future__ import annotations

import json
from pathlib import Path

from load_schedule import percentiles
from serve_client import RequestResult
from serve_process import LOAD_SECONDS, TIER_EVENTS, metrics_diff



def load_summary(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    # Time per output token after the first, per request: the decode speed each user sees.
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok if r.ttft is not None and r.completion_tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests_sent": len(results), "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
        "distinct_tenants": len({r.tenant for r in results}), "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "output_tokens": tokens, "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([g for r in ok for g in r.token_gaps]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": errors,
    }


def tier_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """The server's tier counters over the load run (from /metrics): hits, misses, evictions, load seconds."""
    diff = metrics_diff(before, after)
    out: dict = {}
    for tier in ("gpu", "host"):
        events = {e: int(diff.get(f"{TIER_EVENTS}{{event={e},tier={tier}}}", 0)) for e in ("hit", "miss", "load", "eviction")}
        count, total = diff.get(f"{LOAD_SECONDS}_count{{tier={tier}}}", 0.0), diff.get(f"{LOAD_SECONDS}_sum{{tier={tier}}}", 0.0)
        out[tier] = events | {"mean_load_s": total / count if count else None}
    return out


GRAPH_COUNTERS = {"captures": "deltaserve_decode_graph_captures_total{}",
                  "capture_s": "deltaserve_decode_graph_capture_seconds_total{}",
                  "covering_steps": "deltaserve_decode_graph_covering_steps_total{}"}


def graph_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """The engine's decode-graph counters over the load run (from /metrics): captures, their seconds on the step
    thread (each pauses every running sequence), and steps replayed by covering graphs."""
    diff = metrics_diff(before, after)
    return {name: diff.get(key) for name, key in GRAPH_COUNTERS.items()}


def _fmt(x: float | None, scale: float = 1000.0) -> str:
    return "-" if x is None else f"{x * scale:.1f}"


def markdown(result: dict) -> str:
    p, load, cold = result["params"], result["load"], result["cold"]
    lines = [f"# Serving load: {result['model_name']} on {result['device']}", "",
             "`" + result["command"] + "`", "",
             "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()), "",
             f"Tenants: {result['tenants']['registered']} registered, sharing {result['tenants']['distinct_delta_files']} "
             f"distinct random delta files of {result['tenants']['delta_file_bytes'] / 1e6:.1f} MB "
             f"(store on disk: {result['tenants']['store_bytes'] / 1e9:.2f} GB).", "",
             f"Requests: {load['requests_ok']} ok, {load['requests_failed']} failed, over {load['distinct_tenants']} "
             f"distinct tenants in {load['wall_s']:.1f} s: **{load['requests_per_s']:.2f} req/s, "
             f"{load['output_tokens_per_s']:.1f} output tok/s**.", "",
             "| latency (ms) | p50 | p90 | p99 | mean | n |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("ttft_s", "time to first token"), ("itl_s", "inter-token latency"),
                       ("tpot_s", "time per output token"), ("e2e_s", "end-to-end")):
        s = load[key]
        lines.append(f"| {label} | {_fmt(s['p50'])} | {_fmt(s['p90'])} | {_fmt(s['p99'])} | {_fmt(s['mean'])} | {s['n']} |")
    tiers = result["tiers_during_load"]
    lines += ["", "Delta tiers during the run (server counters; gpu = the engine's delta slots):", "",
              "| tier | hits | misses | loads | evictions | mean load (ms) |", "|---|---:|---:|---:|---:|---:|"]
    for tier, t in tiers.items():
        lines.append(f"| {tier} | {t['hit']} | {t['miss']} | {t['load']} | {t['eviction']} | {_fmt(t['mean_load_s'])} |")
    g = result.get("graphs_during_load")
    if g and g["captures"] is not None:
        lines += ["", f"Decode CUDA graphs during the run (server counters): {int(g['captures'])} captured, "
                  f"{g['capture_s']:.2f} s of capture on the step thread, "
                  f"{int(g['covering_steps'] or 0)} steps replayed by covering graphs."]
    lines += ["", f"Cold-tenant loads (one request at a time, idle server; page cache dropped for "
              f"{cold['page_cache_dropped_files']} probe files):", "",
              "| delta was on | TTFT p50 (ms) | TTFT mean (ms) | server: whole slot load, mean (ms) | "
              "server: disk read + validation, mean (ms) | probes |", "|---|---:|---:|---:|---:|---:|"]
    for tier, s in cold["by_tier"].items():
        lines.append(f"| {tier} | {_fmt(s['ttft_s']['p50'])} | {_fmt(s['ttft_s']['mean'])} | "
                     f"{_fmt(s['server_slot_load_s']['mean'])} | {_fmt(s['server_disk_read_s']['mean'])} | "
                     f"{s['ttft_s']['n']} |")
    if load["errors"]:
        lines += ["", "Errors:", ""] + [f"- {n} x {msg}" for msg, n in load["errors"].items()]
    return "\n".join(lines) + "\n"


def plot(results: list[RequestResult], path: Path, title: str) -> bool:
    """TTFT of every request over the run, and the inter-token latency distribution. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if r.error is None and r.ttft is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.scatter([r.start for r in ok], [r.ttft * 1000 for r in ok], s=6, c=[r.tenant for r in ok], cmap="viridis")
    a.set(xlabel="request sent at (s)", ylabel="TTFT (ms)", yscale="log", title="TTFT (colour: popularity rank)")
    gaps = sorted(g * 1000 for r in ok for g in r.token_gaps)
    if gaps:
        b.plot(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))])
    b.set(xlabel="inter-token latency (ms)", ylabel="CDF", xscale="log", title="inter-token latency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(result: dict, results: list[RequestResult], stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    written[1].write_text(markdown(result))
    if plot(results, stem.with_suffix(".png"), f"{result['model_name']} on {result['device']}"):
        written.append(stem.with_suffix(".png"))
    return written
