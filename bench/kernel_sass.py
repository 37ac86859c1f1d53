"""SASS of the decode (bit-serial) delta kernels, compiled for a GPU architecture on any machine, GPU or not.

Triton compiles for a target it is told (triton.compile with a GPUTarget) and ships ptxas and cuobjdump, so the
instructions of a kernel's loops can be read on the CPU machine before any device time is spent. For each decode
kernel at the launch configs a Llama-2-7B decode step takes (the config table named by --table, else the
built-in defaults), this reports the registers, every loop (a backward branch) with its instruction count and the
instructions that matter to the bit-serial loops: loads (LDG), shuffles (SHFL), barriers (BAR), predicate tests
and predicated adds (LOP3, FADD), predicate spills (P2R, R2P) and register spills to local memory (STL, LDL).

Usage (CPU or GPU; ~15 s):
    python bench/kernel_sass.py [--table kernels/configs/NVIDIA_H100_80GB_HBM3.json] [--arch 90] [--label NAME]
        [--out DIR]
writes DIR/kernel_sass[_LABEL].{json,md} (default bench/results). To compare with an older checkout, run the
script with PYTHONPATH naming a folder that holds that checkout's `deltaserve` package first, and another --label.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deltaserve.kernels.lowrank_expand import _expand_decode_kernel
from deltaserve.kernels.lowrank_shrink import _shrink_decode_kernel
from deltaserve.kernels.sign_delta import _sign_decode_kernel
from deltaserve.kernels.tuning import decode_config

GROUP = 128  # Delta-CoMe's scale group along the quantized axis
OPCODES = ("LDG", "SHFL", "BAR", "LOP3", "FADD", "P2R", "R2P", "STL", "LDL")
# The pointer and int arguments of each kernel in order (the rest are its constexprs, from the launch config).
META = {"sorted_rows_ptr": "*i32", "seg_slots_ptr": "*i32", "seg_starts_ptr": "*i32", "seg_lens_ptr": "*i32",
        "blk_seg_ptr": "*i32", "blk_start_ptr": "*i32"}
SIGNATURES = {
    "shrink": (_shrink_decode_kernel, {"xq_ptr": "*i32", "xs_ptr": "*fp32", "z_ptr": "*fp32", "tiers_ptr": "*i64",
                                       **META, "d_in": "i32", "group_size": "i32", "stride_qm": "i32",
                                       "stride_sm": "i32", "stride_zm": "i32", "BLOCK_M": "i32"}),
    "expand": (_expand_decode_kernel, {"ws_ptr": "*fp32", "z_ptr": "*fp32", "tiers_ptr": "*i64", "projs_ptr": "*i64",
                                       **META, "group_size": "i32", "stride_wm": "i32", "stride_zm": "i32",
                                       "BLOCK_M": "i32"}),
    "sign": (_sign_decode_kernel, {"ws_ptr": "*fp32", "xq_ptr": "*i32", "xs_ptr": "*fp32", "projs_ptr": "*i64",
                                   **META, "d_in": "i32", "stride_wm": "i32", "stride_qm": "i32", "stride_sm": "i32",
                                   "BLOCK_M": "i32"}),
}
# (kernel, row tiles of the launch, rows a tile): batch 64 over 64 tenants (one row a tile), over 32 (two rows) and
# over 16 (four rows).
CASES = tuple((kernel, 64 // rows, rows) for kernel in ("shrink", "expand", "sign") for rows in (1, 2, 4))
OPTIONS = ("num_warps", "maxnreg")  # decode_config's entries that are compile options, not constexprs


@dataclass
class Loop:
    start: int   # byte address of the first instruction
    end: int     # byte address of the backward branch
    instructions: int
    opcodes: dict[str, int]


def compile_cubin(kernel: str, config: dict[str, int], rows: int, arch: int) -> bytes:
    fn, signature = SIGNATURES[kernel]
    constexprs = {"DECODE_ROWS": rows, **{k: v for k, v in config.items() if k not in OPTIONS}}
    if "ASM" in fn.arg_names:
        constexprs["ASM"] = True  # the GPU's dp4a (kernels/bitserial.fixed_point_range_dots)
    names = fn.arg_names  # both tables keyed by position in the kernel's own argument order
    src = ASTSource(fn=fn, signature={n: signature.get(n, "constexpr") for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {k: config[k] for k in OPTIONS if k in config}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without its predicate) of every SASS line."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        out.append((int(m.group(1), 16), text))
    return out


def loops(code: list[tuple[int, str]]) -> list[Loop]:
    """Every loop, as the span from a backward branch's target to the branch, innermost first."""
    found = []
    for addr, text in code:
        m = re.match(r"BRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [t for a, t in code if start <= a <= addr]
            ops = Counter(t.split()[0].split(".")[0] for t in body)
            found.append(Loop(start, addr, len(body), {op: ops.get(op, 0) for op in OPCODES}))
    return sorted(found, key=lambda loop: loop.instructions)


def inspect(kernel: str, work: int, rows: int, arch: int) -> dict:
    config = decode_config(kernel, work, GROUP, rows)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / f"{kernel}.cubin"
        cubin.write_bytes(compile_cubin(kernel, config, rows, arch))
        usage = re.search(r"REG:(\d+)", cuobjdump("-res-usage", str(cubin)))
        code = instructions(cuobjdump("-sass", str(cubin)))
    return {"kernel": kernel, "work": work, "rows": rows, "config": config,
            "registers": int(usage.group(1)) if usage else None, "instructions": len(code),
            "loops": [asdict(loop) for loop in loops(code)]}


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# SASS of the decode kernels (sm_{res['arch']}, triton {res['triton']}; {res['label']})", "",
             f"`{res['command']}`; launch configs from {res['table'] or 'the built-in defaults'}, group size "
             f"{GROUP}. Loops innermost first; an outer loop's count includes its inner loops.", "",
             "| kernel | row tiles | rows a tile | registers | loop | instructions | " + " | ".join(OPCODES) + " |",
             "|---|---:|---:|---:|---|---:|" + "---:|" * len(OPCODES)]
    for r in res["kernels"]:
        for i, loop in enumerate(r["loops"]):
            lines.append(f"| {r['kernel']} | {r['work']} | {r['rows']} | {r['registers']} | "
                         f"{i + 1}: 0x{loop['start']:x}-0x{loop['end']:x} | {loop['instructions']} | "
                         + " | ".join(str(loop["opcodes"][op]) for op in OPCODES) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=None, help="config table of the launch configs")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_sass.py compiles for a GPU: unset TRITON_INTERPRET")
    if args.table:
        os.environ["DELTASERVE_KERNEL_CONFIGS"] = str(args.table.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_sass" + ("" if args.label == "this checkout" else "_" + re.sub(r"\W+", "_", args.label))
    res = {"command": shlex.join(["python", "bench/kernel_sass.py", *sys.argv[1:]]),
           "arch": args.arch, "triton": triton.__version__, "label": args.label,
           "table": str(args.table) if args.table else None,
           "kernels": [inspect(k, w, r, args.arch) for k, w, r in CASES]}
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, args.out / f"{stem}.md")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
