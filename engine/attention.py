"""Attention over a paged KV cache, in torch: each step writes its new K/V into cache blocks, then every
sequence attends over its own blocks, gathered by block table into one padded batch for SDPA."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Where one step's tokens go and what they see; built once per step by the model runner.

    Tokens are laid out sequence after sequence: sequence i owns q_len[i] consecutive tokens.
    """

    positions: torch.Tensor        # int64 [T]: position of each new token in its sequence
    slot_mapping: torch.Tensor     # int64 [T]: flat cache index (block * block_size + offset) of each new token
    kv_index: torch.Tensor         # int64 [N, max_ctx]: flat cache index of every context position
    q_index: torch.Tensor          # int64 [N, max_q]: token row of each query of a sequence (0 past q_len)
    mask: torch.Tensor             # bool [N, 1, max_q, max_ctx]: causal and length mask
    out_rows: torch.Tensor         # int64 [T]: position of each token in the flattened [N * max_q] output

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> AttentionMetadata:
        """q_lens: new tokens per sequence; ctx_lens: tokens with KV after this step (prefix + new)."""
        max_q, max_ctx = max(q_lens), max(ctx_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], device=device)
        q_len = torch.tensor(q_lens, device=device)
        ctx = torch.tensor(ctx_lens, device=device)
        kj = torch.arange(max_ctx, device=device)
        qi = torch.arange(max_q, device=device)
        # Positions past a sequence's context point into its last block or block 0; the mask hides them.
        kv_index = tables[:, kj // block_size] * block_size + kj % block_size
        q_pos = (ctx - q_len)[:, None] + qi[None, :]                       # [N, max_q]
        valid_q = qi[None, :] < q_len[:, None]
        seq_of_token, q_of_token = valid_q.nonzero(as_tuple=True)          # row-major: sequence after sequence
        positions = q_pos[seq_of_token, q_of_token]
        starts = torch.cumsum(q_len, 0) - q_len
        q_index = torch.where(valid_q, starts[:, None] + qi[None, :], 0)
        mask = kj[None, None, :] <= q_pos[:, :, None]
        # Padding queries see key 0 only, so their (discarded) softmax has no empty row and no NaN.
        mask |= ~valid_q[:, :, None] & (kj[None, None, :] == 0)
        return cls(positions, kv_index[seq_of_token, positions], kv_index, q_index, mask.unsqueeze(1),
                   seq_of_token * max_q + q_of_token)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D]; caches [num_blocks * block_size, KVH, D] -> out [T, H * D]."""
    # index_copy_ / index_select: several times faster on CPU than advanced-index assignment and gather.
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    n, max_ctx = meta.kv_index.shape
    flat = meta.kv_index.view(-1)
    keys = k_cache.index_select(0, flat).view(n, max_ctx, *k.shape[1:]).transpose(1, 2)     # [N, KVH, ctx, D]
    values = v_cache.index_select(0, flat).view(n, max_ctx, *v.shape[1:]).transpose(1, 2)
    max_q = meta.q_index.shape[1]
    queries = q.index_select(0, meta.q_index.view(-1)).view(n, max_q, *q.shape[1:]).transpose(1, 2)  # [N, H, q, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(n * max_q, -1).index_select(0, meta.out_rows)
