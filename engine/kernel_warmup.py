"""Compile the Triton kernels a request can need before the engine takes requests.

A kernel compiles the first time a launch needs a new variant (tile shapes, unpacking, constexprs, dtypes, the
divisibility and alignment of its arguments): about a second each on the H100, inside the step that needed it,
so every running sequence stalls with it (bench/results/first_use.md: 2.4 s TTFT for a repeated request whose
short prefill took a new row-tile height). Like vLLM's start-up dummy runs with dummy LoRAs, the engine
launches each delta kernel on small random deltas of the model's own input widths and dtype: the tl.dot kernels
once per row-tile height and per config the launch table can pick, the decode kernels once per (rows, split)
variant, every variant at once on the static tiles of covering decode graphs (engine/decode_graphs.py) once per
decode split where the engine uses them, the dense path's dequantization once, the paged-attention kernels
once, and the layer's own fused ops (residual add + RMSNorm with and without the add and the tenants' norm deltas,
rotary + KV write, SwiGLU) once each. Nothing of the engine's state is touched: the synthetic deltas, inputs and outputs are thrown away.
Triton keeps the compiled kernels on disk, so a restart on the same machine loads them in milliseconds.
"""
from __future__ import annotations

import torch

from deltaserve.engine.layers import DeltaLinear
from deltaserve.engine.model import LlamaModel
from deltaserve.kernels import LowRankProjection, SlotMetadata, lowrank_plan_for, sign_plan_for
from deltaserve.kernels.lowrank_dense import dequantized_factors
from deltaserve.kernels.lowrank_expand import expand_triton
from deltaserve.kernels.lowrank_shrink import shrink_triton
from deltaserve.kernels.paged_attention import paged_decode_attention
from deltaserve.kernels.random_slots import random_signs, random_tier
from deltaserve.kernels.rms_norm import add_rms_norm
from deltaserve.kernels.rotary_cache import rotary_cache
from deltaserve.kernels.sign_delta import add_sign_delta_triton
from deltaserve.kernels.swiglu import silu_mul
from deltaserve.kernels.tuning import WORK_BUCKETS, block_m_for, covering_variants, decode_variants, warmup_configs

DOT_ROWS = (16, 32, 64)  # rows of one tenant: one tl.dot row tile of each height block_m_for gives
SLOTS = max(WORK_BUCKETS)  # one row on each of n slots makes n decode tiles
GROUP_SIZE = 128          # the compressor's default; a delta of another group size compiles on first use
SIGN_ROWS = 64            # sign matrix rows per part: the row count is a runtime argument, so a few will do


def warm_up_kernels(model: LlamaModel, kv_cache: tuple[torch.Tensor, torch.Tensor], block_size: int,
                    covering: bool = False) -> int:
    """Launch every delta kernel variant for each distinct linear shape of the model, and paged attention;
    returns the number of launches. covering: the engine replays covering decode graphs, so their variants too."""
    shapes = {}
    for module in [*model.layers[0].modules(), model.lm_head]:
        if isinstance(module, DeltaLinear):
            d_in = module.weight.shape[1]
            shapes.setdefault((d_in, tuple(w.shape[0] for w, _ in module.parts)), module.weight.dtype)
    g = torch.Generator(device=kv_cache[0].device).manual_seed(0)
    launches = 0
    for (d_in, d_outs), dtype in shapes.items():
        calls = _calls(d_in, sum(d_outs), dtype, g, covering)
        launches += _lowrank(d_in, d_outs, calls, g) + _sign(d_in, d_outs, calls, g)
    return launches + _attention(model, kv_cache, block_size, g) + _layer_ops(model, g)


def _parts(d_outs: tuple[int, ...]) -> list[tuple[int, int]]:
    """(output offset, d_out) of each stacked part."""
    return [(sum(d_outs[:i]), d) for i, d in enumerate(d_outs)]


Call = tuple[int, torch.Tensor, torch.Tensor, SlotMetadata]   # see _calls; y is scratch, shared by the kernels


def _calls(d_in: int, d_total: int, dtype: torch.dtype, g: torch.Generator, covering: bool) -> list[Call]:
    """(tl.dot tile height or 0 for the launch table's own choice, x, y, rows) of every warm-up call: one tenant's
    DOT_ROWS rows, `rows` rows on each of n slots for every (n, rows) of decode_variants, and with `covering` one
    row on each of n slots in static metadata launching every variant for every n of covering_variants (n tiles
    there)."""
    row_slots = [(block_m_for(n), [0] * n, False) for n in DOT_ROWS] + [
        (0, [slot for slot in range(n) for _ in range(rows)], False) for n, rows in decode_variants(GROUP_SIZE)] + [
        (0, list(range(n)), True) for n in (covering_variants(GROUP_SIZE) if covering else [])]
    calls = []
    for block_m, slots, every_variant in row_slots:
        x = torch.randn(len(slots), d_in, generator=g, device=g.device).to(dtype)
        y = torch.zeros(len(slots), d_total, dtype=dtype, device=g.device)
        meta = SlotMetadata.from_host(slots, SLOTS, g.device, pad_to=len(slots) if every_variant else None)
        if every_variant:
            meta.launch_every_variant()
        calls.append((block_m, x, y, meta))
    return calls


def _lowrank(d_in: int, d_outs: tuple[int, ...], calls: list[Call], g: torch.Generator) -> int:
    projections = [LowRankProjection(off, d, [random_tier([2] * SLOTS, [2] * SLOTS, 2, 2, d_in, d, GROUP_SIZE, g)])
                   for off, d in _parts(d_outs)]
    plan = lowrank_plan_for(projections)
    launches = 0
    for block_m, x, y, meta in calls:
        # Decode tiles take no config; tl.dot tiles compile once per distinct config.
        shrink = warmup_configs("shrink", GROUP_SIZE, block_m) if block_m else [None]
        expand = warmup_configs("expand", GROUP_SIZE, block_m) if block_m else [None]
        for config in shrink:
            z = shrink_triton(x, meta, plan, GROUP_SIZE, config)
        for config in expand:
            expand_triton(y, z, meta, plan, GROUP_SIZE, config)
        launches += len(shrink) + len(expand)
    dequantized_factors(plan, 0, d_in, GROUP_SIZE, calls[0][1].dtype)  # the dense path of long prefill segments
    return launches + 1


def _sign(d_in: int, d_outs: tuple[int, ...], calls: list[Call], g: torch.Generator) -> int:
    projections = [random_signs(SLOTS, d_in, min(d, SIGN_ROWS), off, g) for off, d in _parts(d_outs)]
    plan = sign_plan_for(projections)
    launches = 0
    for block_m, x, y, meta in calls:
        for config in warmup_configs("sign", None, block_m) if block_m else [None]:
            add_sign_delta_triton(y, x, meta, projections, plan, config)
            launches += 1
    return launches


def _attention(model: LlamaModel, kv_cache: tuple[torch.Tensor, torch.Tensor], block_size: int,
               g: torch.Generator) -> int:
    """The split kernel alone (one split: its partial-output pointers are then the output's dtype, another
    variant) and with the combine kernel (two splits), reading nothing of the cache: context 0."""
    layer = model.layers[0]
    heads = layer.num_heads + layer.num_kv_heads
    qk = torch.randn(1, heads, layer.head_dim, generator=g, device=g.device).to(kv_cache[0].dtype)
    tables = torch.zeros(1, 2, dtype=torch.int32, device=g.device)
    ctx = torch.zeros(1, dtype=torch.int32, device=g.device)
    for splits in (1, 2):
        paged_decode_attention(qk[:, : layer.num_heads], *kv_cache, tables, ctx, block_size, 1.0, num_splits=splits)
    return 3


def _layer_ops(model: LlamaModel, g: torch.Generator) -> int:
    """The fused ops of a decoder layer, on one random row and synthetic caches and norm deltas (a tenant's first
    norm delta must not compile inside its request)."""
    layer = model.layers[0]
    dtype, device = layer.input_layernorm.weight.dtype, g.device
    hidden, inner = layer.input_layernorm.weight.shape[0], layer.down_proj.weight.shape[1]
    x = torch.randn(1, hidden, generator=g, device=device).to(dtype)
    deltas, slots = torch.randn(2, hidden, generator=g, device=device).to(dtype), torch.ones(1, dtype=torch.int32,
                                                                                              device=device)
    for residual in (None, x):
        for delta, slot in ((None, None), (deltas, slots)):
            add_rms_norm(x, residual, layer.input_layernorm.weight, 1e-6, delta, slot)
    silu_mul(torch.randn(1, 2 * inner, generator=g, device=device).to(dtype))
    heads, kv_heads, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=g, device=device).to(dtype)
    cos_sin = torch.randn(2, 1, d, generator=g, device=device).to(dtype)
    cache = torch.zeros(2, 1, kv_heads, d, dtype=dtype, device=device)
    rotary_cache(qkv, cos_sin[0], cos_sin[1], cache[0], cache[1], torch.zeros(1, dtype=torch.int64, device=device),
                 heads)
    return 6
