"""Batched sampling: temperature, top-k, top-p per row, each row drawing from its own seeded generator."""
from __future__ import annotations

import torch

from deltaserve.engine.config import SamplingParams
from deltaserve.kernels.tables import upload_lists


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits fp32 [B, V] -> token ids int64 [B]. Greedy rows take the argmax (first on ties, like transformers)."""
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return tokens
    vocab = logits.shape[-1]
    picked = [params[i] for i in random_rows]
    # Host values go up without waiting for the device (the token read after sampling is the step's one sync).
    rows, top_k = upload_lists([random_rows, [p.top_k if 0 < p.top_k < vocab else vocab for p in picked]],
                              logits.device)
    temperature, top_p = upload_lists([[p.temperature for p in picked], [p.top_p for p in picked]], logits.device,
                                     torch.float32)
    scaled = logits.index_select(0, rows) / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Top-p keeps the smallest prefix whose mass reaches p: drop a token once the mass before it is >= p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # One draw per row from its own generator; the picks are gathered and written back batched.
    choices = torch.cat([torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(random_rows)])
    return tokens.index_copy_(0, rows, order.gather(1, choices[:, None]).squeeze(1))


def logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model log-probabilities (before temperature and truncation, as OpenAI reports them):
    chosen fp32 [B], top values fp32 [B, top_n], top ids int64 [B, top_n]."""
    lp = logits.log_softmax(dim=-1)
    top_values, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], chosen[:, None][:, :0])
    return lp.gather(1, chosen[:, None]).squeeze(1), top_values, top_ids
