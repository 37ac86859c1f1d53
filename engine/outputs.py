"""What the engine hands back: per-request output deltas, logprobs, and engine statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    token: str          # the token's text on its own (for OpenAI top_logprobs)
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one generated token under the model (before temperature / top-p / top-k)."""

    token_id: int
    token: str
    logprob: float | None           # None only for a prompt's first token, which nothing predicts
    top_logprobs: list[TopLogprob] = field(default_factory=list)   # the `logprobs` most likely, best first


@dataclass(slots=True)
class RequestOutput:
    """What one request gained in one step; the stream of these is the whole completion."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int      # total so far, not only this delta
    # With the first token only, for a request with prompt_logprobs: one entry per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    last_batch_size: int = 0            # sequences in the last step
    last_distinct_slots: int = 0        # distinct tenants (slots, base counted as one) in the last step
    last_num_prefill_tokens: int = 0
    steps_total: int = 0
    backbone_bytes: int = 0
    delta_slot_bytes: int = 0
    kv_cache_bytes: int = 0
    graph_captures: int = 0             # decode CUDA graphs captured since start (start-up ones included)
    graph_capture_seconds: float = 0.0  # step-thread time those captures took
    graph_covering_steps: int = 0       # decode steps replayed by a batch size's covering graph
    running_slots: list[int] = field(default_factory=list)   # slots of running requests (for lora_requests_info)
    waiting_slots: list[int] = field(default_factory=list)
