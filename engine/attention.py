"""Attention over a paged KV cache, in torch: each step writes its new K/V into cache blocks, then every
sequence attends over its own blocks, gathered by block table into a padded batch for SDPA.

Decodes (one query each) and prefill chunks (many) form separate padded batches, so a long prefill chunk
never pads every decode row to its length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended as one padded batch; N sequences, queries padded to max_q, keys to max_ctx."""

    kv_index: torch.Tensor         # int64 [N, max_ctx]: flat cache index of every context position
    q_index: torch.Tensor          # int64 [N, max_q]: step token row of each query (0 past the sequence's queries)
    mask: torch.Tensor             # bool [N, 1, max_q, max_ctx]: causal and length mask
    padded_rows: torch.Tensor      # int64 [T_g]: rows of the flattened [N * max_q] output that are real queries
    token_rows: torch.Tensor       # int64 [T_g]: the step token row each of those is


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
        """q_lens: new tokens per sequence; ctx_lens: tokens with KV after this step (prefix + new)."""
        starts, total = [], 0
        for q in q_lens:
            starts.append(total)
            total += q
        positions = torch.empty(total, dtype=torch.int64, device=device)
        slot_mapping = torch.empty(total, dtype=torch.int64, device=device)
        groups = []
        for keep in (lambda q: q == 1, lambda q: q > 1):
            members = [i for i, q in enumerate(q_lens) if keep(q)]
            if members:
                group, pos, slots = _group([q_lens[i] for i in members], [ctx_lens[i] for i in members],
                                           [block_tables[i] for i in members], [starts[i] for i in members],
                                           block_size, device)
                positions[group.token_rows] = pos
                slot_mapping[group.token_rows] = slots
                groups.append(group)
        return cls(positions, slot_mapping, groups)


def _group(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], starts: list[int],
           block_size: int, device: torch.device) -> tuple[AttentionGroup, torch.Tensor, torch.Tensor]:
    """One padded batch, plus the positions and cache slots of its new tokens (in token_rows order)."""
    max_q, max_ctx = max(q_lens), max(ctx_lens)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], device=device)
    q_len = torch.tensor(q_lens, device=device)
    ctx = torch.tensor(ctx_lens, device=device)
    start = torch.tensor(starts, device=device)
    kj = torch.arange(max_ctx, device=device)
    qi = torch.arange(max_q, device=device)
    # Positions past a sequence's context point into its last block or block 0; the mask hides them.
    kv_index = tables[:, kj // block_size] * block_size + kj % block_size
    q_pos = (ctx - q_len)[:, None] + qi[None, :]                       # [N, max_q]
    valid_q = qi[None, :] < q_len[:, None]
    seq, query = valid_q.nonzero(as_tuple=True)                         # sequence after sequence
    positions = q_pos[seq, query]
    q_index = torch.where(valid_q, start[:, None] + qi[None, :], 0)
    mask = kj[None, None, :] <= q_pos[:, :, None]
    # Padding queries see key 0 only, so their (discarded) softmax has no empty row and no NaN.
    mask |= ~valid_q[:, :, None] & (kj[None, None, :] == 0)
    group = AttentionGroup(kv_index, q_index, mask.unsqueeze(1), seq * max_q + query, start[seq] + query)
    return group, positions, kv_index[seq, positions]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D]; caches [num_blocks * block_size, KVH, D] -> out [T, H * D]."""
    # index_copy_ / index_select: several times faster on CPU than advanced-index assignment and gather.
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for g in meta.groups:
        n, max_ctx = g.kv_index.shape
        max_q = g.q_index.shape[1]
        flat = g.kv_index.view(-1)
        keys = k_cache.index_select(0, flat).view(n, max_ctx, *k.shape[1:]).transpose(1, 2)  # [N, KVH, ctx, D]
        values = v_cache.index_select(0, flat).view(n, max_ctx, *v.shape[1:]).transpose(1, 2)
        queries = q.index_select(0, g.q_index.view(-1)).view(n, max_q, *q.shape[1:]).transpose(1, 2)
        res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        out.index_copy_(0, g.token_rows, res.transpose(1, 2).reshape(n * max_q, -1).index_select(0, g.padded_rows))
    return out
