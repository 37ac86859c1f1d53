"""One request as the scheduler sees it: its tokens, how many have KV in the cache, and its blocks."""
from __future__ import annotations

import enum

import torch

from deltaserve.engine.config import SamplingParams
from deltaserve.engine.detokenizer import Detokenizer


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()      # no KV yet (new, or preempted and waiting to be recomputed)
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Prompt + generated tokens of one request.

    ``num_computed`` tokens have their K/V in the cache; the next step feeds tokens
    ``[num_computed, num_computed + n)``. A sequence samples a token in a step whose chunk reaches the end
    of its tokens. Preemption drops the KV (``num_computed = 0``); the generated tokens stay, so a
    recomputed sequence continues exactly where it was.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, slot: int,
                 generator: torch.Generator | None, detokenizer: Detokenizer, cache_key: tuple[int, int]):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.slot = slot
        self.generator = generator          # None for greedy requests
        self.detokenizer = detokenizer
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.cache_key = cache_key          # (slot, its load generation): whose K/V these blocks hold
        self.block_names: list[int] = []    # prefix-cache names of the filled blocks (see BlockManager)
        # Prompt tokens' logprobs so far (params.prompt_logprobs; LLMEngine.add_request writes the first token's,
        # whose logprob is None), sent with the first output.
        self.prompt_logprobs: list | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
