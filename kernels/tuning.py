"""Launch configs of the delta kernels: tile sizes, split and bit-plane unpacking strategy, chosen on the host
without timing anything.

Triton's autotuner times every config at the first call of each new key. In the server that first call lands
inside a request: on the H100 a new (shape, row tile, work) key stalled every running sequence for seconds
(bench/results/serve.log: 895 ms a step at batch 64 with one tenant, a graph capture with its tuning inside the
timed steps; serve_load_smollm2_1000t: no request finished within 105 s). So, like vLLM's LoRA kernels, a
call's config comes from
1. a table for this GPU (kernels/configs/<device name>.json, or the file named by $DELTASERVE_KERNEL_CONFIGS),
   written by bench/tune_kernels.py, which times the candidates below on that GPU; else
2. defaults measured on the H100: in bench/results/kernel_variants.md the autotuner picked these tiles for
   shrink, expand and sign in all but one case, with the split growing as the call has fewer row tiles.
Keys are the weight shapes, the group size, the row-tile height and a power-of-two bucket of the row-tile
count (work_bucket), never the token count, so a new batch size never changes the kernel that runs.
Tiles along a quantized axis must fit inside one scale group (group_size is a multiple of 32): cut below.
Every Triton compile is one the server would pay inside a request (about a second each on the H100), so the
tl.dot kernels take their split and the decode-row policy as runtime arguments, never specialized on
(do_not_specialize): one compile per tile shape, UNPACK and dtype serves every work bucket. The decode kernels
keep DECODE_ROWS and their split as constexprs: runtime ones made the expand decode kernel 1.5x slower with one
row per tenant (a bounded row loop; kernel_bench on the H100, qkv batch 64 x 64 tenants 307 -> 466 us) and the
shrink 3-5% slower. Their few variants (decode_variants) are compiled at start-up (engine/kernel_warmup.py).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from .bitplanes import UNPACK_NAMES

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Tile names of each kernel (row-tile height BLOCK_M comes from the slot metadata), and the one whose tile
# must divide the scale group (sign has no groups).
TILE_NAMES = {"shrink": ("BLOCK_R", "BLOCK_K", "SPLIT_K"), "expand": ("BLOCK_R", "BLOCK_N", "SPLIT_R"),
              "sign": ("BLOCK_N", "BLOCK_K", "SPLIT_K")}
GROUP_AXIS = {"shrink": "BLOCK_K", "expand": "BLOCK_N", "sign": None}
KERNELS = tuple(TILE_NAMES)  # each has a decode (bit-serial) and a tl.dot variant


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """One launch's meta-parameters: the kernel's three tiles, UNPACK (an index into UNPACK_NAMES), warps, stages."""

    tiles: tuple[int, int, int]
    unpack: int = 0
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self, kernel: str) -> dict:
        """Keyword arguments of kernel[grid](...): the constexprs, num_warps and num_stages."""
        return {**dict(zip(TILE_NAMES[kernel], self.tiles)), "UNPACK": self.unpack, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def compile_key(self) -> tuple:
        """The fields that are constexprs or compile options: configs equal here share one compiled kernel (the
        split, tiles[2], is a runtime argument)."""
        return (*self.tiles[:2], self.unpack, self.num_warps, self.num_stages)

    def to_json(self, kernel: str) -> dict:
        """launch_kwargs with the strategy by name, as config tables hold it."""
        return {**self.launch_kwargs(kernel), "UNPACK": UNPACK_NAMES[self.unpack]}

    @classmethod
    def from_json(cls, kernel: str, entry: dict) -> LaunchConfig:
        """Raises ValueError (naming what is wrong) for an entry that is not a config of `kernel`."""
        names = (*TILE_NAMES[kernel], "UNPACK", "num_warps", "num_stages")
        if not isinstance(entry, dict) or set(entry) != set(names):
            raise ValueError(f"a {kernel} config needs exactly the fields {names}, got {entry!r}")
        tiles = tuple(entry[n] for n in TILE_NAMES[kernel])
        counts = (*tiles, entry["num_warps"], entry["num_stages"])
        if not all(isinstance(v, int) and v > 0 for v in counts) or entry["UNPACK"] not in UNPACK_NAMES:
            raise ValueError(f"bad {kernel} config {entry!r}: positive integers and UNPACK one of {UNPACK_NAMES}")
        if any(t & (t - 1) for t in tiles[:2]):
            raise ValueError(f"bad {kernel} config {entry!r}: tiles must be powers of two")
        return cls(tiles, UNPACK_NAMES.index(entry["UNPACK"]), entry["num_warps"], entry["num_stages"])


def group_tile_index(kernel: str) -> int | None:
    """Position in LaunchConfig.tiles of the tile along the quantized axis (None: sign has no scale groups)."""
    axis = GROUP_AXIS[kernel]
    return None if axis is None else TILE_NAMES[kernel].index(axis)


def spans_groups(kernel: str, tiles: tuple[int, ...], group_size: int | None) -> bool:
    """Whether a tile along the quantized axis would span two scale groups (the kernels assume it never does)."""
    i = group_tile_index(kernel)
    return i is not None and group_size % tiles[i] != 0


WORK_BUCKETS = tuple(2 ** i for i in range(7))  # every value of work_bucket


def work_bucket(num_row_tiles: int) -> int:
    """Key for how many row tiles (roughly, distinct slots) a launch has: the best split depends on it. Powers
    of two up to 64 (WORK_BUCKETS)."""
    return min(triton.next_power_of_2(max(num_row_tiles, 1)), WORK_BUCKETS[-1])


def table_key(kernel: str, shape: tuple[int, ...], group_size: int | None, work: int, block_m: int) -> str:
    """Key of a config table entry, e.g. "shrink d=4096,941 g=128 w=16 m=16" (shape: shrink (d_in, max_rank_cap),
    expand (max_d_out,), sign (d_in, max_d_out))."""
    return f"{kernel} d={','.join(map(str, shape))} g={group_size or 0} w={work} m={block_m}"


def default_config(kernel: str, work: int) -> LaunchConfig:
    """The untuned choice. Few row tiles mean few, long programs (decode is latency-bound before it is
    bandwidth-bound), so the reduction axis is split more ways, each piece's partial sums added atomically."""
    if _interpreting():  # small tiles: the interpreter's time grows with them, and nothing is timed there
        return LaunchConfig((16, 32, 2), num_stages=1)
    if kernel == "shrink":
        return LaunchConfig((32, 128, 8 if work <= 2 else 4 if work <= 16 else 2 if work <= 32 else 1))
    if kernel == "expand":
        return LaunchConfig((32, 128, 4 if work <= 4 else 2 if work <= 8 else 1))
    return LaunchConfig((64, 128, 8 if work <= 2 else 4 if work <= 16 else 1))


# The strategy forced_unpack holds (None: the table's or the default's). The interpreter runs the first unless
# a test forces another.
_forced: list[str | None] = [UNPACK_NAMES[0] if _interpreting() else None]


def launch_config(kernel: str, shape: tuple[int, ...], group_size: int | None, work: int,
                  block_m: int) -> LaunchConfig:
    """The config one call of `kernel` runs (see the module docstring for where it comes from)."""
    return _launch_config(kernel, shape, group_size, work, block_m, _forced[0])


@lru_cache(maxsize=4096)
def _launch_config(kernel: str, shape: tuple[int, ...], group_size: int | None, work: int, block_m: int,
                   forced: str | None) -> LaunchConfig:
    config = config_table().get(table_key(kernel, shape, group_size, work, block_m)) or default_config(kernel, work)
    return _adjusted(kernel, config, group_size, block_m, forced)


def warmup_configs(kernel: str, group_size: int | None, block_m: int) -> list[LaunchConfig]:
    """One config per distinct compile that launch_config can give `kernel` at row tiles of block_m, for any
    shape and work (the table's entries for this group size and tile height, and the defaults): what the
    engine compiles before taking requests (engine/kernel_warmup.py). Splits are runtime arguments, so configs
    that differ only there are one compile."""
    forced = _forced[0]
    found = [default_config(kernel, w) for w in WORK_BUCKETS]
    for key, config in config_table().items():
        name, _, g, _, m = key.split(" ")
        if name == kernel and g == f"g={group_size or 0}" and m == f"m={block_m}":
            found.append(config)
    distinct: dict[tuple, LaunchConfig] = {}
    for config in found:
        c = _adjusted(kernel, config, group_size, block_m, forced)
        distinct.setdefault(c.compile_key(), c)
    return list(distinct.values())


def _adjusted(kernel: str, config: LaunchConfig, group_size: int | None, block_m: int,
              forced: str | None) -> LaunchConfig:
    """config as a launch at this group size and tile height can run it."""
    tiles, unpack = list(config.tiles), config.unpack
    if spans_groups(kernel, config.tiles, group_size):
        # A group size the tile does not divide (32, or 96): the largest power of two dividing it (>= 32).
        i = group_tile_index(kernel)
        tiles[i] = min(tiles[i], group_size & -group_size)
    if forced is not None:
        unpack = UNPACK_NAMES.index(forced)
    if kernel == "expand" and block_m >= 64:
        # triton 3.6 on the H100 compiles no "pairs" expand config at 64-row tiles ("Illegal shared layout" in
        # TritonGPUOptimizeDotOperands); planes computes the same numbers.
        unpack = UNPACK_NAMES.index("planes")
    return LaunchConfig(tuple(tiles), unpack, config.num_warps, config.num_stages)


@contextmanager
def forced_unpack(strategy: str) -> Iterator[None]:
    """Within this block every delta kernel runs the `strategy` unpacking (one of UNPACK_NAMES), tiles unchanged."""
    if strategy not in UNPACK_NAMES:
        raise ValueError(f"unknown unpack strategy {strategy!r}, expected one of {UNPACK_NAMES}")
    previous = _forced[0]
    _forced[0] = strategy
    try:
        yield
    finally:
        _forced[0] = previous


def device_slug(device: torch.device | None = None) -> str:
    """File name stem of a GPU's config table: its name with every run of other characters as one '_'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def config_table_path() -> Path | None:
    """$DELTASERVE_KERNEL_CONFIGS, else this GPU's file in kernels/configs/ if there is one (None off CUDA)."""
    named = os.environ.get("DELTASERVE_KERNEL_CONFIGS")
    if named:
        return Path(named)
    if _interpreting() or not torch.cuda.is_available():
        return None
    path = CONFIG_DIR / f"{device_slug()}.json"
    return path if path.exists() else None


@lru_cache(maxsize=None)
def _read_table(path: Path | None) -> dict[str, LaunchConfig]:
    if path is None:
        return {}
    try:
        entries = json.loads(path.read_text()).get("configs", {})  # none where only tune_decode.py has run
        return {key: LaunchConfig.from_json(key.split(" ")[0], entry) for key, entry in entries.items()}
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"kernel config table {path}: {e} (bench/tune_kernels.py writes these files)") from e


def config_table() -> dict[str, LaunchConfig]:
    """Entries of the config table in use (read once per path), by table_key."""
    return _read_table(config_table_path())


def write_config_table(path: Path, configs: dict[str, LaunchConfig], about: dict) -> None:
    """Write the launch configs read back by config_table, keeping the file's decode_configs."""
    _update_table_file(path, {**about, "configs": {k: c.to_json(k.split(" ")[0]) for k, c in sorted(configs.items())}})


def write_decode_table(path: Path, entries: dict[str, dict[str, int]], about: dict, keep_others: bool = False) -> None:
    """Write the decode kernels' meta-parameters read back by decode_config (bench/tune_decode.py's, by
    decode_table_key) as the table's decode_configs, keeping its launch configs. keep_others: these entries
    replace only their own keys (a run that tuned some keys), else the whole section (a run that tuned all)."""
    if keep_others and path.exists():
        body = json.loads(path.read_text())
        entries = {**body.get("decode_configs", {}), **entries}
        about = {**about, "other_keys_from": body.get("decode_about", {}).get("command")}
    _update_table_file(path, {"decode_about": about, "decode_configs": dict(sorted(entries.items()))})


def _update_table_file(path: Path, sections: dict) -> None:
    """The table file with these top-level entries replaced, written atomically (a server starting meanwhile
    reads the old or the new file): each tuning script owns its sections."""
    body = json.loads(path.read_text()) if path.exists() else {}
    body.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)


# Candidates bench/tune_kernels.py times on a GPU: (three tiles, UNPACK name, num_warps, num_stages).
def candidates(kernel: str) -> list[LaunchConfig]:
    rows = {
        "shrink": [
            (32, 128, 1, "planes", 4, 3), (32, 128, 4, "planes", 4, 3), (32, 128, 8, "planes", 4, 3),
            (16, 128, 8, "planes", 4, 3), (64, 128, 4, "planes", 4, 3), (32, 64, 8, "planes", 4, 3),
            (16, 128, 16, "planes", 4, 3), (64, 128, 8, "planes", 8, 3), (32, 128, 2, "planes", 4, 3),
            (16, 64, 8, "pairs", 4, 4), (32, 64, 8, "pairs", 4, 3), (16, 128, 8, "pairs", 4, 3),
            (32, 128, 4, "pairs", 4, 3), (32, 128, 8, "pairs", 8, 3), (64, 128, 4, "pairs", 8, 3)],
        "expand": [
            (32, 128, 1, "planes", 4, 3), (32, 128, 4, "planes", 4, 3), (32, 128, 8, "planes", 4, 3),
            (64, 128, 4, "planes", 8, 3), (16, 128, 8, "planes", 4, 3), (32, 64, 4, "planes", 4, 3),
            (64, 64, 8, "planes", 4, 3), (32, 128, 16, "planes", 4, 3), (32, 128, 2, "planes", 4, 3),
            (16, 64, 8, "pairs", 4, 4), (32, 64, 4, "pairs", 4, 3), (16, 128, 8, "pairs", 4, 3),
            (32, 128, 4, "pairs", 4, 3), (32, 128, 8, "pairs", 8, 3), (64, 128, 4, "pairs", 8, 3)],
        "sign": [
            (64, 128, 1, "planes", 4, 3), (64, 128, 4, "planes", 4, 3), (64, 256, 4, "planes", 8, 3),
            (128, 128, 4, "planes", 8, 3), (64, 128, 8, "planes", 4, 3), (32, 256, 8, "planes", 4, 3),
            (32, 128, 8, "pairs", 4, 3), (64, 128, 4, "pairs", 4, 3), (64, 256, 4, "pairs", 8, 3)],
    }[kernel]
    return [LaunchConfig((a, b, c), UNPACK_NAMES.index(u), w, s) for a, b, c, u, w, s in rows]


@dataclass(frozen=True)
class DecodeRowsPolicy:
    """Which row tiles one kernel's decode (bit-serial) variant takes: one-row tiles always; tiles of 2..max_rows
    rows in steps of at least from_tiles row tiles; taller ones go to its tl.dot variant."""

    max_rows: int     # 1, 2 or 4: the decode kernel's DECODE_ROWS (rounded up to a power of two)
    from_tiles: int


# From bench/results/decode_rows_sweep.md (H100, with the decode table of bench/tune_decode.py; each kernel timed on
# the same steps both ways, 1-64 tenants):
# - expand: a tile's rows share each bit test; two-row tiles ran 1.65-3.8x and four-row tiles 1.1-2.1x faster on
#   the decode kernel than on tl.dot, from one tile up (four rows with the register cap below);
# - shrink: two-row tiles, summed over a 7B layer's four shapes, won from one tile up (117 vs 122 us at one tile,
#   226 vs 249 at four, 299 vs 470 at eight); four rows ran 0.59-0.91x as fast as on tl.dot. With the shrink
#   config of Nov 24 two rows lost at four tiles (312 vs 249 us) and the threshold was 8 tiles
#   (decode_rows_sweep_nov24.md).
# - sign: a tile's rows share each bit test; two rows 1.02-1.46x from one tile up, four rows 0.64-0.90x.
# Since the shrink and sign kernels build each k tile's byte codes before dp4a (stop 25), four rows there pay: four
# rows a tenant ran 1.10-1.38x faster than as tl.dot tiles (shrink with SHARE_ROWS), no other case outside 0.99-1.02x
# (bench/results/kernel_ab_rows4.md, kernel_ab_rows4_sign.md).
DECODE_ROWS_POLICY = {"shrink": DecodeRowsPolicy(4, 1), "expand": DecodeRowsPolicy(4, 1),
                      "sign": DecodeRowsPolicy(4, 1)}
_forced_rows: list[int | None] = [None]


def decode_rows(heights: Sequence[int], kernel: str) -> int:
    """DECODE_ROWS of `kernel`'s decode variant in a step whose row tiles have these heights: its tiles of at most
    that many rows take the decode variant, taller ones the tl.dot variant (DECODE_ROWS_POLICY says which). A
    decode program tests each bit once for a tile's rows (the shrink with SHARE_ROWS, its default for such tiles;
    the expand and sign kernels always), a tl.dot program unpacks each code once for a whole tile but through
    shared memory. The interpreter takes multi-row tiles from 2 tiles, so the tests' small batches run the decode
    kernels on them."""
    if _forced_rows[0] is not None:
        return _forced_rows[0]
    policy = DECODE_ROWS_POLICY[kernel]
    if len(heights) < (min(policy.from_tiles, 2) if _interpreting() else policy.from_tiles):
        return 1
    # The step's tallest decode tile, not the policy's most: a kernel compiled for more rows than a step has does
    # their adds anyway (one-row tiles ran ~13% faster on the kernels compiled for one row: decode_rows_ab.md).
    return triton.next_power_of_2(max((h for h in heights if h <= policy.max_rows), default=1))


@contextmanager
def forced_decode_rows(rows: int) -> Iterator[None]:
    """Within this block every kernel's DECODE_ROWS is `rows` (1, 2 or 4) in every step, whatever its tiles
    (bench/decode_rows_sweep.py times both variants on the same tiles this way)."""
    if rows not in (1, 2, 4):
        raise ValueError(f"DECODE_ROWS must be 1, 2 or 4, got {rows}")
    previous = _forced_rows[0]
    _forced_rows[0] = rows
    try:
        yield
    finally:
        _forced_rows[0] = previous


def decode_variants(group_size: int) -> list[tuple[int, int]]:
    """(row-tile count, rows a tile), one per distinct set of (DECODE_ROWS, decode_config) pairs of the three
    kernels a decode launch can take at this group size: each pair is a compile of a decode kernel (its rows and
    split are constexprs)."""
    seen: dict[tuple, tuple[int, int]] = {}
    for n_tiles in WORK_BUCKETS:
        for rows in (1, 2, 4):
            key = []
            for kernel in KERNELS:
                decode = decode_rows([rows] * n_tiles, kernel)
                key.append((decode, tuple(decode_config(kernel, n_tiles, group_size, decode).items())))
            seen.setdefault(tuple(key), (n_tiles, rows))
    return list(seen.values())


def covering_variants(group_size: int) -> list[int]:
    """Row-tile counts, one per distinct set of the three kernels' decode_config at their policy's most rows: the
    decode compiles that launches of every variant (SlotMetadata.launch_every_variant) take at this group size."""
    seen: dict[tuple, int] = {}
    for n_tiles in WORK_BUCKETS:
        key = tuple(tuple(decode_config(k, n_tiles, group_size, DECODE_ROWS_POLICY[k].max_rows).items())
                    for k in KERNELS)
        seen.setdefault(key, n_tiles)
    return list(seen.values())


# Registers a thread of the expand decode kernel may take, by DECODE_ROWS. Left to itself ptxas took 95 (one row),
# 167 (two) and 243 (four): 5, 3 and 2 programs an SM. Capped, it needs no spills up to two rows and 5 spilled
# registers at four (SASS with triton 3.6 for sm_90); four rows ran 1.2-1.9x faster capped
# (bench/results/decode_rows_sweep_uncapped4.md against decode_rows_sweep_nov24.md).
EXPAND_DECODE_REGISTERS = {1: 80, 2: 128, 4: 168}


def expand_block_words(rows: int) -> int:
    """Plane words an expand decode thread loads together (kernels/lowrank_expand.py): four for tiles of one or
    two rows (1.18-1.44x faster than one, bench/results/kernel_ab_expand_blocks.md), one for four rows, where four
    words' registers spilled under the register cap and the kernel was 1.19-1.25x slower."""
    return 4 if rows <= 2 else 1


# Meta-parameters forced_decode_config holds, by kernel (empty: decode_config's own).
_forced_decode: dict[str, dict[str, int]] = {}


@contextmanager
def forced_decode_config(kernel: str, **params: int) -> Iterator[None]:
    """Within this block `kernel`'s decode variant takes these meta-parameters in place of decode_config's, the
    others unchanged (bench/tune_decode.py times candidates this way)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}, expected one of {KERNELS}")
    previous = _forced_decode.pop(kernel, None)
    _forced_decode[kernel] = params
    try:
        yield
    finally:
        _forced_decode.pop(kernel)
        if previous is not None:
            _forced_decode[kernel] = previous


def decode_config(kernel: str, work: int, group_size: int | None, rows: int = 1) -> dict[str, int]:
    """The meta-parameters of `kernel`'s decode variant: _default_decode_config's, over them this GPU's table entry
    (bench/tune_decode.py), over both any that forced_decode_config holds."""
    table = _decode_table_entry(kernel, group_size, work, rows)
    return {**_default_decode_config(kernel, work, group_size, rows), **table, **_forced_decode.get(kernel, {})}


def decode_table_key(kernel: str, group_size: int | None, work: int, rows: int) -> str:
    """Key of a decode kernel's entry in the table's decode_configs, e.g. "shrink g=128 w=16 r=1". The sign kernel
    has no scale groups: its keys say g=0 whatever group size the caller names (bench/tune_decode.py wrote g=128,
    which the kernel, asking with none, never found: stops 21-24 ran it on the built-in defaults)."""
    group = group_size if GROUP_AXIS[kernel] else None
    return f"{kernel} g={group or 0} w={work} r={rows}"


# The meta-parameters a decode table entry may set, by kernel (the decode kernels' constexprs and launch options).
DECODE_PARAMS = {"shrink": ("BLOCK_R", "BLOCK_K", "SPLIT_K", "SHARE_ROWS", "num_warps", "maxnreg"),
                 "expand": ("BLOCK_N", "SPLIT_R", "BLOCK_WORDS", "num_warps", "maxnreg"),
                 "sign": ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps")}


@lru_cache(maxsize=1024)
def _decode_table_entry(kernel: str, group_size: int | None, work: int, rows: int) -> dict[str, int]:
    """This GPU's table entry for the key, or none. Cached: decode_config is asked at every delta call, and finding
    the table takes a device query."""
    return _read_decode_table(config_table_path()).get(decode_table_key(kernel, group_size, work, rows), {})


@lru_cache(maxsize=None)
def _read_decode_table(path: Path | None) -> dict[str, dict[str, int]]:
    if path is None:
        return {}
    try:
        entries = json.loads(path.read_text()).get("decode_configs", {})
        for key, params in entries.items():
            kernel = key.split(" ")[0]
            allowed = DECODE_PARAMS.get(kernel, ())
            if not params.keys() <= set(allowed) or not all(type(v) is int and v >= 0 for v in params.values()):
                raise ValueError(f"decode entry {key!r} = {params}: expected non-negative ints of {allowed}")
            if kernel in GROUP_AXIS and not GROUP_AXIS[kernel] and " g=0 " not in key:
                raise ValueError(f"decode entry {key!r}: {kernel} has no scale groups, its keys say g=0")
        return entries
    except (OSError, AttributeError, ValueError) as e:
        raise ValueError(f"kernel config table {path}: {e} (bench/tune_decode.py writes its decode_configs)") from e


def _default_decode_config(kernel: str, work: int, group_size: int | None, rows: int = 1) -> dict[str, int]:
    """Meta-parameters of the decode (bit-serial) kernel of `kernel` ("shrink", "expand" or "sign"), chosen from
    their SASS (kernels/bitserial.py), A/B runs (bench/results/kernel_ab_decode_tiles.md) and bench/tune_decode.py
    (bench/results/decode_tuning.md): a shrink thread keeps 4 words of one 32-element column of a k tile, so the 32
    x values it loads serve all four; its programs take 64 ranks on 2 warps, split twice the base split ways (the
    kernel waits on memory latency: 1.15-1.36x faster than 128 ranks on 4 warps at the old split, and within 5% of
    every candidate timed); a sign thread keeps 2 (128 rows was slower than 64). Fewer row tiles split the reduction
    more ways to fill the GPU."""
    if _interpreting():
        return {"BLOCK_R": 16, "BLOCK_K": 32, "SPLIT_K": 2, "SHARE_ROWS": 0} if kernel == "shrink" else \
            {"BLOCK_N": 64, "SPLIT_R": 2, "BLOCK_WORDS": expand_block_words(rows)} if kernel == "expand" else \
            {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}
    split = 16 if work <= 2 else 8 if work <= 8 else 4 if work <= 32 else 2
    if kernel == "shrink":
        return {"BLOCK_R": 64, "BLOCK_K": min(128, group_size & -group_size), "SPLIT_K": 2 * split,
                "SHARE_ROWS": int(rows > 1), "num_warps": 2}
    if kernel == "expand":
        # Each program walks all of its ranks over a word per thread (4096 columns on 4 warps); the split divides the
        # ranks. Four-row tiles (128 fp32 sums a thread) ran 1.056x faster on half the columns and warps, in both
        # bench/tune_decode.py runs; other heights within 1% either way.
        warps = 2 if rows == 4 else 4
        return {"BLOCK_N": 1024 * warps, "SPLIT_R": 4 * split, "BLOCK_WORDS": expand_block_words(rows),
                "num_warps": warps, "maxnreg": EXPAND_DECODE_REGISTERS[rows]}
    return {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": 4}


def block_m_for(max_seg_len: int) -> int:
    """Row-tile height: the smallest tl.dot-able tile holding a whole segment, so rows sharing a slot read its
    bytes once, up to 64 (prefill segments then take several tiles, re-reading the slot from L2)."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(x_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of tl.dot for activations of x_dtype: the activation dtype itself (the centred codes and
    +-1 signs are exact in it). Triton's CPU interpreter multiplies bf16 operands as raw integers (seen with
    triton 3.9), so there they go as fp32, which holds every bf16 value exactly."""
    if _interpreting() and x_dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[x_dtype]
