"""Batched sampling: penalties, logit_bias and min_tokens shape the logits, then temperature, top-k, top-p per row,
each row drawing from its own seeded generator."""
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


def process_logits(logits: torch.Tensor, params: list[SamplingParams], token_ids: list[list[int]],
                   prompt_lens: list[int], eos_token_ids: list[int]) -> torch.Tensor:
    """logits fp32 [B, V] as each row's request shapes them before sampling (a new tensor; the same one if no row
    asks for anything), in vLLM's order: the repetition penalty on every token of the row's prompt or output, minus
    the frequency penalty times each token's count in the output and minus the presence penalty once per token in
    it; plus logit_bias; then, before min_tokens, EOS (unless ignored) and stop_token_ids masked out.
    token_ids: each row's prompt then output tokens, the first prompt_lens of them the prompt's."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    device = logits.device
    picked = [params[i] for i in rows]
    (index,) = upload_lists([rows], device)
    part = logits.index_select(0, index)
    penalized = [(j, i) for j, (i, p) in enumerate(zip(rows, picked)) if p.penalized]
    if penalized:
        part = _penalize(part, [j for j, _ in penalized], [params[i] for _, i in penalized],
                         [token_ids[i][prompt_lens[i]:] for _, i in penalized],
                         [token_ids[i][:prompt_lens[i]] for _, i in penalized])
    # logit_bias and the min_tokens mask as flat (row, token, value) lists, added at once.
    bias = [(j, t, b) for j, p in enumerate(picked) for t, b in p.logit_bias.items()]
    for j, (i, p) in enumerate(zip(rows, picked)):
        if len(token_ids[i]) - prompt_lens[i] < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            bias += [(j, t, float("-inf")) for t in banned]
    if bias:
        bias_rows, bias_tokens = upload_lists([[j for j, _, _ in bias], [t for _, t, _ in bias]], device)
        (values,) = upload_lists([[b for _, _, b in bias]], device, torch.float32)
        part.index_put_((bias_rows, bias_tokens), values, accumulate=True)
    return logits.index_copy(0, index, part)


def _penalize(part: torch.Tensor, at: list[int], params: list[SamplingParams], outputs: list[list[int]],
              prompts: list[list[int]]) -> torch.Tensor:
    """part's rows `at` with their penalties (see process_logits). Every (row, token) occurrence goes up as flat
    index lists, output and prompt tokens apart (only the repetition penalty looks at the prompt's), counted on the
    device."""
    device, vocab = part.device, part.shape[-1]
    out_row = [k for k, ids in enumerate(outputs) for _ in ids]
    out_tok = [t for ids in outputs for t in ids]
    prompt_row = [k for k, ids in enumerate(prompts) for _ in ids]
    prompt_tok = [t for ids in prompts for t in ids]
    row_ids, tok_ids, prompt_rows, prompt_toks, rows = upload_lists([out_row, out_tok, prompt_row, prompt_tok, at],
                                                                    device)
    rep, freq, pres = upload_lists([[p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
                                    [p.presence_penalty for p in params]], device, torch.float32)
    counts = torch.zeros(len(at), vocab, device=device)
    counts.index_put_((row_ids, tok_ids), torch.ones_like(tok_ids, dtype=counts.dtype), accumulate=True)
    seen = counts > 0
    seen.index_put_((prompt_rows, prompt_toks), torch.ones_like(prompt_toks, dtype=torch.bool))
    rows_logits = part.index_select(0, rows)
    rows_logits = torch.where(seen, torch.where(rows_logits > 0, rows_logits / rep[:, None],
                                                rows_logits * rep[:, None]), rows_logits)
    rows_logits = rows_logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
    return part.index_copy(0, rows, rows_logits)


def logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model log-probabilities (before temperature and truncation, as OpenAI reports them):
    chosen fp32 [B], top values fp32 [B, top_n], top ids int64 [B, top_n]."""
    lp = logits.log_softmax(dim=-1)
    top_values, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], chosen[:, None][:, :0])
    return lp.gather(1, chosen[:, None]).squeeze(1), top_values, top_ids
