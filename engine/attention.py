"""Attention over a paged KV cache, in torch: each step writes its new K/V into cache blocks, then every
sequence attends over its own blocks, gathered by block table into a padded batch for SDPA.

Decodes (one query each) and prefill chunks (many) form separate padded batches, so a long prefill chunk
never pads every decode row to its length.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from deltaserve.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from deltaserve.kernels.tables import upload_array, upload_lists


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended as one padded batch; N sequences, queries padded to max_q, keys to max_ctx."""

    kv_index: torch.Tensor         # int64 [N, max_ctx]: flat cache index of every context position
    q_index: torch.Tensor          # int64 [N, max_q]: step token row of each query (0 past the sequence's queries)
    mask: torch.Tensor             # bool [N, 1, max_q, max_ctx]: causal and length mask
    padded_rows: torch.Tensor      # int64 [T_g]: rows of the flattened [N * max_q] output that are real queries
    token_rows: torch.Tensor       # int64 [T_g]: the step token row each of those is
    in_order: bool                 # the padded batch is every step row in order (N * max_q = T): no gather needed


@dataclass(slots=True)
class AttentionMetadata:
    """Where one step's tokens go and what they see; built once per step by the model runner.

    Tokens are laid out sequence after sequence: sequence i owns q_len[i] consecutive rows.
    """

    positions: torch.Tensor        # int64 [T]: position of each new token in its sequence
    slot_mapping: torch.Tensor     # int64 [T]: flat cache index (block * block_size + offset) of each new token
    groups: list[AttentionGroup]

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> AttentionMetadata:
        """q_lens: new tokens per sequence; ctx_lens: tokens with KV after this step (prefix + new).

        Every index is computed on the host and goes up in one non-blocking copy; the [N, max_ctx] key index and
        mask are derived from it on the device. Nothing here waits for the device.
        """
        positions, slot_mapping = [], []
        for q, ctx, table in zip(q_lens, ctx_lens, block_tables):
            for pos in range(ctx - q, ctx):
                positions.append(pos)
                slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        starts = list(itertools.accumulate(q_lens, initial=0))[:-1]
        members = [m for m in ([i for i, q in enumerate(q_lens) if q == 1], [i for i, q in enumerate(q_lens) if q > 1])
                   if m]
        plans = [_GroupPlan([q_lens[i] for i in m], [ctx_lens[i] for i in m], [block_tables[i] for i in m],
                            [starts[i] for i in m]) for m in members]
        views = upload_lists([positions, slot_mapping] + [part for plan in plans for part in plan.parts], device)
        in_order = len(set(q_lens)) == 1
        groups = [plan.group(views[2 + 6 * k : 8 + 6 * k], block_size, in_order) for k, plan in enumerate(plans)]
        return cls(views[0], views[1], groups)


@dataclass(slots=True)
class DecodeAttention:
    """A decode-only step in shapes fixed by its padded row count P (what a captured CUDA graph replays): one
    query per row, each row's whole block table. Padding rows have context 0 (their output is 0) and write
    their K/V to a scratch cache row that no sequence owns."""

    positions: torch.Tensor        # int64 [P]
    slot_mapping: torch.Tensor     # int64 [P]
    block_tables: torch.Tensor     # int32 [P, max_blocks]
    ctx_lens: torch.Tensor         # int32 [P]: tokens with KV after this step (0 = padding row)
    block_size: int

    @classmethod
    def build(cls, ctx_lens: list[int], block_tables: list[list[int]], block_size: int, pad_to: int,
              max_blocks: int, scratch_row: int, device: torch.device) -> DecodeAttention:
        pad = pad_to - len(ctx_lens)
        positions = [n - 1 for n in ctx_lens] + [0] * pad
        slot_mapping = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                        for n, t in zip(ctx_lens, block_tables)] + [scratch_row] * pad
        # The [P, max_blocks] table in numpy, row by row: as one Python list then torch.tensor it cost 2.6 ms of
        # host time a step at batch 128 with 4k-token contexts (256 blocks a row), time the GPU waits; this way
        # 0.16 ms (CPU; bench/results/host_step_costs.md). Then the context lengths, 16-byte aligned as
        # upload_packed aligns its views (Triton specializes on a pointer's alignment).
        ctx_at = -(-pad_to * max_blocks // 4) * 4
        words = np.zeros(ctx_at + pad_to, dtype=np.int32)
        tables = words[: pad_to * max_blocks].reshape(pad_to, max_blocks)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        words[ctx_at : ctx_at + len(ctx_lens)] = ctx_lens
        on_device = upload_array(words, device)
        views = upload_lists([positions, slot_mapping], device)
        return cls(views[0], views[1], on_device[: pad_to * max_blocks].view(pad_to, max_blocks),
                   on_device[ctx_at:], block_size)

    def copy_(self, other: DecodeAttention) -> None:
        """Take `other`'s step into these tensors in place (the ones a captured graph reads)."""
        for name in ("positions", "slot_mapping", "block_tables", "ctx_lens"):
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)


class _GroupPlan:
    """The host side of one AttentionGroup: its int lists (uploaded with the step's others) and sizes."""

    def __init__(self, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], starts: list[int]):
        self.n, self.max_q, self.max_ctx = len(q_lens), max(q_lens), max(ctx_lens)
        self.max_blocks = max(len(t) for t in block_tables)
        q_index, padded_rows, token_rows = [], [], []
        for i, (q, start) in enumerate(zip(q_lens, starts)):
            q_index += list(range(start, start + q)) + [0] * (self.max_q - q)
            padded_rows += range(i * self.max_q, i * self.max_q + q)
            token_rows += range(start, start + q)
        # Positions past a sequence's context point into its last block or block 0; the mask hides them.
        tables = [b for t in block_tables for b in t + [0] * (self.max_blocks - len(t))]
        self.parts = [tables, q_lens, ctx_lens, q_index, padded_rows, token_rows]

    def group(self, views: list[torch.Tensor], block_size: int, in_order: bool) -> AttentionGroup:
        """The group from its uploaded parts (views, in self.parts order), deriving key index and mask on device."""
        tables, q_len, ctx, q_index, padded_rows, token_rows = views
        device = tables.device
        kj = torch.arange(self.max_ctx, device=device)
        qi = torch.arange(self.max_q, device=device)
        kv_index = tables.view(self.n, self.max_blocks).index_select(1, kj // block_size) * block_size + kj % block_size
        q_pos = (ctx - q_len)[:, None] + qi[None, :]                       # [N, max_q]
        mask = kj[None, None, :] <= q_pos[:, :, None]
        if self.max_q > 1:
            # Padding queries see key 0 only, so their (discarded) softmax has no empty row and no NaN.
            mask |= (qi[None, :] >= q_len[:, None])[:, :, None] & (kj[None, None, :] == 0)
        return AttentionGroup(kv_index, q_index.view(self.n, self.max_q), mask.unsqueeze(1), padded_rows, token_rows,
                              in_order)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata | DecodeAttention, scale: float) -> torch.Tensor:
    """q [T, H, D]; caches [num_blocks * block_size, KVH, D], the step's own K/V already written at
    meta.slot_mapping (kernels/rotary_cache.py) -> out [T, H * D]."""
    if isinstance(meta, DecodeAttention):
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_reference
        return attend(q, k_cache, v_cache, meta.block_tables, meta.ctx_lens, meta.block_size, scale).flatten(1)
    if len(meta.groups) == 1 and meta.groups[0].in_order:
        return _attend(q, k_cache, v_cache, meta.groups[0], scale)      # every row, already in order
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for g in meta.groups:
        out.index_copy_(0, g.token_rows, _attend(q, k_cache, v_cache, g, scale).index_select(0, g.padded_rows))
    return out


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
            scale: float) -> torch.Tensor:
    """One group's padded batch -> out [N * max_q, H * D], padding rows included."""
    n, max_ctx = g.kv_index.shape
    max_q = g.q_index.shape[1]
    flat = g.kv_index.view(-1)
    # index_select: several times faster on CPU than advanced-index gather
    keys = k_cache.index_select(0, flat).view(n, max_ctx, *k_cache.shape[1:]).transpose(1, 2)  # [N, KVH, ctx, D]
    values = v_cache.index_select(0, flat).view(n, max_ctx, *v_cache.shape[1:]).transpose(1, 2)
    queries = q.view(n, max_q, *q.shape[1:]) if g.in_order else q.index_select(0, g.q_index.view(-1)).view(
        n, max_q, *q.shape[1:])
    res = masked_sdpa(queries.transpose(1, 2), keys, values, g.mask, scale)
    return res.transpose(1, 2).reshape(n * max_q, -1)


# cuDNN's SDPA, torch's first pick on the H100, builds an execution plan for every new shape inside the call: a
# prefill batch of a new (sequences, tokens, context) shape took 40 ms at the median and up to 0.94 s there, against
# 0.29 ms for the memory-efficient kernel, which builds nothing (bench/results/sdpa_first_use.md). Serving meets
# new shapes all the time, and such a stall holds every running sequence, so cuDNN is never picked.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_sdpa(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
    """SDPA of queries [N, H, q, D] over keys/values [N, KVH, ctx, D] under a boolean mask [N, 1, q, ctx]."""
    group = queries.shape[1] // keys.shape[1]
    if group > 1 and queries.is_cuda:
        # The memory-efficient kernel takes no grouped heads, and math would hold [N, H, q, ctx] scores: repeat
        # the key/value heads ([N, H, ctx, D], the size of the gathered keys times the group) instead.
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    with sdpa_kernel(PREFILL_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=queries.shape[1] != keys.shape[1])
