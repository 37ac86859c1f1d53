"""Tune the delta kernels' launch configs for this GPU: time every candidate of kernels/tuning.py at every table
key the Llama-2-7B shapes reach, and write the fastest per key as the GPU's config table.

The cases are decode batches x distinct tenants plus prefill-like batches of long segments (row tiles of 32 and
64 rows); row i belongs to tenant i % tenants. Several cases map to one key (table_key: weight shape, group
size, row-tile height, bucket of the row-tile count); each key is timed once, on the first case reaching it.
The table holds the tl.dot kernels' configs: a case whose tiles all take the decode kernels (one or two rows a
tenant; their configs are fixed, tuning.decode_config) reaches no key.
Shrink, expand and sign are timed alone (CUDA graph replay, L2 flushed: kernel_bench.ms). A candidate is
skipped, and the report says why, when its group-axis tile does not divide the group size, when the compiler
rejects it, or when its output differs from the PyTorch reference: the table never selects a wrong kernel.

Usage (GPU, ~5 min on an H100):
    python bench/tune_kernels.py [--shapes qkv,o] [--time-budget SECONDS] [--table PATH] [--out DIR]
writes kernels/configs/<GPU name>.json (read by kernels/tuning.py; it holds this run's keys only) and
DIR/kernel_tuning.json and .md (default bench/results). The script needs CUDA; on CPU it exits saying so
(tests/test_tune_kernels.py covers its logic on CPU).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from deltaserve.kernels import SlotMetadata
from deltaserve.kernels.bitplanes import UNPACK_NAMES
from deltaserve.kernels.lowrank_expand import expand_reference, expand_triton
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_shrink import shrink_reference, shrink_triton
from deltaserve.kernels.sign_delta import add_sign_delta_reference, add_sign_delta_triton, sign_plan_for
from deltaserve.kernels.tuning import (CONFIG_DIR, GROUP_AXIS, KERNELS, TILE_NAMES, LaunchConfig, candidates,
                                       default_config, device_slug, spans_groups, table_key, work_bucket,
                                       write_config_table)
from kernel_bench import BATCHES, SHAPES, TENANTS, Weights, copy_bandwidth, make_weights, ms, rel_err
from random_models import G

PREFILL_ROWS, PREFILL_TENANTS = (512,), (1, 4, 16)  # segments of 512, 128 and 32 rows: row tiles of 64 and 32
MAX_REL_ERR = 1e-2
# Seconds a key takes on the H100, for the up-front estimate: ~35 ms a timing, ~1.5 s a compile (a candidate
# compiles once per row-tile height).
SECONDS_PER_TIMING, SECONDS_PER_COMPILE = 0.035, 1.5


@dataclass(frozen=True)
class Case:
    """A batch of `rows` rows over `tenants` distinct tenants, row i at tenant i % tenants."""

    rows: int
    tenants: int

    def row_slots(self) -> list[int]:
        return [i % self.tenants for i in range(self.rows)]


@dataclass(frozen=True)
class Job:
    """One table key to tune, with the first shape and case that reach it."""

    key: str
    kernel: str
    shape: str
    case: Case
    work: int


@dataclass(frozen=True)
class Outcome:
    """One candidate at one key: its time, or why it was skipped."""

    config: LaunchConfig
    us: float | None = None
    skipped: str | None = None


@dataclass
class KeyResult:
    job: Job
    default: LaunchConfig
    outcomes: list[Outcome] = field(default_factory=list)  # empty: not tuned (time budget)

    def timed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.us is not None]

    def best(self, unpack: int | None = None) -> Outcome | None:
        """Fastest timed candidate (of one unpacking strategy if given), None if none ran."""
        timed = [o for o in self.timed() if unpack is None or o.config.unpack == unpack]
        return min(timed, key=lambda o: o.us, default=None)

    def default_us(self) -> float | None:
        return next((o.us for o in self.outcomes if o.config == self.default), None)


@dataclass(frozen=True)
class KernelCall:
    """One kernel at one case: `result(config)` computes its output from zeros (checked against `reference()`),
    `launch(config)` is the call that is timed."""

    result: Callable[[LaunchConfig], torch.Tensor]
    launch: Callable[[LaunchConfig], object]
    reference: Callable[[], torch.Tensor]


def tuning_cases(batches: Sequence[int], tenants: Sequence[int], prefill_rows: Sequence[int] = PREFILL_ROWS,
                 prefill_tenants: Sequence[int] = PREFILL_TENANTS) -> list[Case]:
    """Decode batches x tenants (tenants <= batch), then the prefill-like cases."""
    decode = [Case(b, t) for b in batches for t in tenants if t <= b]
    return decode + [Case(r, t) for r in prefill_rows for t in prefill_tenants if t <= r]


CaseTiles = dict[str, tuple[int, int] | None]  # kernel -> (row-tile height, work bucket), see case_tiles


def case_tiles(case: Case, num_slots: int, device: torch.device | str) -> CaseTiles:
    """Per kernel, (row-tile height, work bucket) of the case's launches, as the launchers derive them; None when
    no tile takes that kernel's tl.dot variant (SlotMetadata.tile_kinds: one row a tenant, and the shorter tiles
    each kernel's decode variant takes), whose configs the table holds: its launch would do nothing, and timing
    it would tune a key on an empty kernel."""
    meta = SlotMetadata.from_host(case.row_slots(), num_slots, device)
    block_m, blk_seg, _ = meta.launch_tiles()
    tiles = (block_m, work_bucket(blk_seg.shape[0]))
    return {kernel: tiles if meta.tile_kinds(kernel).dot else None for kernel in KERNELS}


def kernel_shapes(w: Weights) -> dict[str, tuple[int, ...]]:
    """The shape part of each kernel's table key, as its launcher forms it from the plans."""
    plan, sign_plan = lowrank_plan_for(w.lowrank), sign_plan_for(w.signs)
    return {"shrink": (w.d_in, plan.max_rank_cap), "expand": (plan.max_d_out,), "sign": (w.d_in, sign_plan.max_d_out)}


def group_size_of(kernel: str) -> int | None:
    return None if GROUP_AXIS[kernel] is None else G


def plan_jobs(shapes: dict[str, dict[str, tuple[int, ...]]], cases: Sequence[Case],
              tiles: dict[Case, CaseTiles]) -> list[Job]:
    """Every distinct key the shapes x cases reach, each with the first (shape, case) reaching it, in shape then
    case order (so jobs of one case come together); a kernel without tl.dot tiles in a case (None) reaches none."""
    jobs, seen = [], set()
    for name, kshapes in shapes.items():
        for case in cases:
            for kernel in KERNELS:
                if tiles[case][kernel] is None:
                    continue
                block_m, work = tiles[case][kernel]
                key = table_key(kernel, kshapes[kernel], group_size_of(kernel), work, block_m)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(key, kernel, name, case, work))
    return jobs


def configs_to_time(kernel: str, work: int) -> list[LaunchConfig]:
    """The candidates, plus the default if it is not one of them (its time is the speedup's baseline)."""
    return list(dict.fromkeys([*candidates(kernel), default_config(kernel, work)]))


def measure(kernel: str, call: KernelCall, want: torch.Tensor, config: LaunchConfig,
            timer: Callable[[Callable[[], object]], float]) -> Outcome:
    """Check one candidate against the reference, then time it (timer: ms of a callable)."""
    if spans_groups(kernel, config.tiles, group_size_of(kernel)):
        return Outcome(config, skipped=f"{GROUP_AXIS[kernel]} does not divide the group size {G}")
    try:
        err = rel_err(call.result(config), want)  # the first launch compiles
    except (RuntimeError, CompilationError, OutOfResources) as e:
        # e.g. triton 3.6 on the H100: "PassManager::run failed" for pairs expand configs at 64-row tiles
        return Outcome(config, skipped=f"does not compile: {str(e).strip().splitlines()[0][:200]}")
    if not err <= MAX_REL_ERR:  # NaN counts as wrong
        return Outcome(config, skipped=f"wrong result (rel. err {err:.1e})")
    return Outcome(config, us=timer(lambda: call.launch(config)) * 1e3)


def tune_job(job: Job, call: KernelCall, timer: Callable[[Callable[[], object]], float]) -> KeyResult:
    want = call.reference()
    result = KeyResult(job, default_config(job.kernel, job.work))
    result.outcomes = [measure(job.kernel, call, want, c, timer) for c in configs_to_time(job.kernel, job.work)]
    return result


def kernel_calls(w: Weights, case: Case, num_slots: int, g: torch.Generator) -> dict[str, KernelCall]:
    """The three kernels on one case, on g's device: fp16 activations, outputs from zeros so the relative error
    is the delta's."""
    meta = SlotMetadata.from_host(case.row_slots(), num_slots, g.device)
    plan, sign_plan = lowrank_plan_for(w.lowrank), sign_plan_for(w.signs)
    x = torch.randn(case.rows, w.d_in, device=g.device, dtype=torch.float16, generator=g)
    y = torch.zeros(case.rows, sum(w.d_outs), device=g.device, dtype=torch.float16)
    z = shrink_triton(x, meta, plan, G)

    def from_zeros(fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
        out = torch.zeros_like(y)
        fill(out)
        return out

    def shrink(c: LaunchConfig) -> torch.Tensor:
        return shrink_triton(x, meta, plan, G, config=c)

    return {
        "shrink": KernelCall(shrink, shrink, lambda: shrink_reference(x, meta, w.lowrank, G)),
        "expand": KernelCall(lambda c: from_zeros(lambda out: expand_triton(out, z, meta, plan, G, config=c)),
                             lambda c: expand_triton(y, z, meta, plan, G, config=c),
                             lambda: from_zeros(lambda out: expand_reference(out, z, meta, w.lowrank, G))),
        "sign": KernelCall(lambda c: from_zeros(lambda out: add_sign_delta_triton(out, x, meta, w.signs, sign_plan,
                                                                                   config=c)),
                           lambda c: add_sign_delta_triton(y, x, meta, w.signs, sign_plan, config=c),
                           lambda: from_zeros(lambda out: add_sign_delta_reference(out, x, meta, w.signs))),
    }


def estimate_seconds(jobs: Sequence[Job], tiles: dict[Case, CaseTiles]) -> float:
    """Rough H100 time of the whole run: every candidate timed, each compiled once per row-tile height."""
    timings = sum(len(configs_to_time(j.kernel, j.work)) for j in jobs)
    heights = {tiles[j.case][j.kernel][0] for j in jobs}
    compiles = sum(len(candidates(k)) for k in {j.kernel for j in jobs}) * len(heights)
    return timings * SECONDS_PER_TIMING + compiles * SECONDS_PER_COMPILE


def tune_all(jobs: list[Job], weights: dict[str, Weights], num_slots: int, budget_s: float | None,
             g: torch.Generator) -> list[KeyResult]:
    """Tune the jobs in order; once budget_s has passed, the remaining keys are listed untuned."""
    start, results = time.time(), []
    timer = partial(ms, quick=True)
    for (name, case), group in itertools.groupby(jobs, key=lambda j: (j.shape, j.case)):
        calls = None  # built once per case, and only if one of its keys is still tuned
        for job in group:
            if budget_s is not None and time.time() - start > budget_s:
                results.append(KeyResult(job, default_config(job.kernel, job.work)))
                continue
            calls = calls or kernel_calls(weights[name], case, num_slots, g)
            results.append(tune_job(job, calls[job.kernel], timer))
            print_progress(results[-1], len(results), len(jobs), time.time() - start)
    return results


def print_progress(r: KeyResult, done: int, total: int, elapsed: float) -> None:
    best, base = r.best(), r.default_us()
    what = (f"best {best.us:7.1f} us {config_text(best.config)}, default {base:7.1f} us" if best and base
            else f"best {best.us:7.1f} us {config_text(best.config)}" if best else "no candidate ran")
    print(f"[{done}/{total}, {elapsed:4.0f} s, ~{elapsed / done * (total - done):4.0f} s left] {r.job.key:38s} "
          f"{what}", flush=True)


def config_text(c: LaunchConfig) -> str:
    """e.g. "32x128/8 planes w4 s3": the kernel's three tiles (TILE_NAMES order), unpacking, warps, stages."""
    return f"{c.tiles[0]}x{c.tiles[1]}/{c.tiles[2]} {UNPACK_NAMES[c.unpack]} w{c.num_warps} s{c.num_stages}"


def best_table(results: Sequence[KeyResult]) -> dict[str, LaunchConfig]:
    return {r.job.key: best.config for r in results if (best := r.best()) is not None}


def report_row(r: KeyResult) -> dict:
    """One key of the report: default vs best time, the best per unpacking strategy, what was skipped."""
    best, base = r.best(), r.default_us()
    per_unpack = {name: (o.us if (o := r.best(i)) else None) for i, name in enumerate(UNPACK_NAMES)}
    return dict(key=r.job.key, kernel=r.job.kernel, shape=r.job.shape, rows=r.job.case.rows,
                tenants=r.job.case.tenants, tuned=bool(r.outcomes), default=r.default.to_json(r.job.kernel),
                default_us=base, best=best.config.to_json(r.job.kernel) if best else None,
                best_us=best.us if best else None, speedup=base / best.us if best and base else None,
                best_us_by_unpack=per_unpack,
                skipped=[dict(config=o.config.to_json(r.job.kernel), why=o.skipped) for o in r.outcomes if o.skipped])


def write_report(results: Sequence[KeyResult], header: dict, out: Path) -> None:
    """out/kernel_tuning.json and out/kernel_tuning.md."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [report_row(r) for r in results]
    (out / "kernel_tuning.json").write_text(json.dumps({**header, "keys": rows}, indent=1) + "\n")
    (out / "kernel_tuning.md").write_text(markdown(results, header))


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(results: Sequence[KeyResult], header: dict) -> str:
    tiles = "; ".join(f"{k} {'x'.join(TILE_NAMES[k][:2])}/{TILE_NAMES[k][2]}" for k in KERNELS)
    lines = [f"# Delta kernel launch configs on {header['device']} (torch {header['torch']}, triton "
             f"{header['triton']})", "",
             f"{header['date']}, `{header['command']}`; copy bandwidth {header['copy_bw_gbs']:.0f} GB/s (read + "
             f"write). Device time in us of each kernel alone (CUDA graph replay, L2 flushed), fp16, group size "
             f"{G}, ~1 bit/param Delta-CoMe tiers; each key timed on the first shape and case reaching it (row i "
             f"at tenant i % tenants). Configs: tiles ({tiles}), unpacking, warps, stages. Best per unpacking: "
             f"the fastest candidate of that strategy.", "",
             "| key | shape | rows | tenants | default | default us | best | best us | speedup | "
             + " | ".join(f"best {n} us" for n in UNPACK_NAMES) + " | skipped |",
             "|---" * (10 + len(UNPACK_NAMES)) + "|"]
    for r in results:
        best, base = r.best(), r.default_us()
        cells = [r.job.key, r.job.shape, str(r.job.case.rows), str(r.job.case.tenants), config_text(r.default),
                 _us(base), config_text(best.config) if best else ("-" if r.outcomes else "not tuned (time budget)"),
                 _us(best.us if best else None), f"{base / best.us:.2f}" if best and base else "-",
                 *(_us(o.us if (o := r.best(i)) else None) for i in range(len(UNPACK_NAMES))),
                 str(sum(o.skipped is not None for o in r.outcomes))]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [(r.job.key, o) for r in results for o in r.outcomes if o.skipped]
    if skipped:
        lines += ["", "## Skipped candidates", "", "| key | config | why |", "|---|---|---|"]
        lines += [f"| {key} | {config_text(o.config)} | {o.skipped.replace('|', '/')} |" for key, o in skipped]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes")
    ap.add_argument("--tenants", default=",".join(map(str, TENANTS)), help="distinct tenants per batch")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop tuning new keys after this long; the rest are reported as not tuned")
    ap.add_argument("--table", type=Path, default=None,
                    help=f"config table to write (default {CONFIG_DIR}/<GPU name>.json)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="report folder")
    return ap.parse_args(argv)


def run_header(bw: float) -> dict:
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=" ".join(sys.argv),
                copy_bw_gbs=bw / 1e9)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/tune_kernels.py times the kernels on a CUDA GPU and none is visible here "
                 "(on CPU: pytest tests/test_tune_kernels.py checks its logic).")
    names = args.shapes.split(",")
    cases = tuning_cases([int(b) for b in args.batches.split(",")], [int(t) for t in args.tenants.split(",")])
    num_slots = max(c.tenants for c in cases)
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: make_weights(name, num_slots, g) for name in names}
    tiles = {case: case_tiles(case, num_slots, "cuda") for case in cases}
    jobs = plan_jobs({name: kernel_shapes(w) for name, w in weights.items()}, cases, tiles)
    print(f"{len(jobs)} keys, {sum(len(configs_to_time(j.kernel, j.work)) for j in jobs)} candidate timings: "
          f"about {estimate_seconds(jobs, tiles) / 60:.0f} min on an H100", flush=True)
    header = run_header(copy_bandwidth())
    results = tune_all(jobs, weights, num_slots, args.time_budget, g)
    table = args.table or CONFIG_DIR / f"{device_slug()}.json"
    write_config_table(table, best_table(results), {k: header[k] for k in ("device", "torch", "triton", "date",
                                                                           "command")})
    write_report(results, header, args.out)
    untuned = sum(not r.outcomes for r in results)
    print(f"wrote {table} ({len(best_table(results))} keys; {untuned} not tuned) and {args.out}/kernel_tuning.md")


if __name__ == "__main__":
    main()
