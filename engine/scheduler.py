"""Continuous batching: which sequences run in the next step, and how many of their tokens (pure Python).

Every step mixes decodes and prefill chunks under one token budget. Running sequences go first, oldest
first; waiting ones are admitted while budget, rows and KV blocks remain. When a running sequence needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later (its generated tokens are kept).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from deltaserve.engine.block_manager import BlockManager
from deltaserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]           # tokens each sequence feeds this step (1 for a decode)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of prompt (or recompute) chunks: everything but single-token decodes. Read before the step."""
        return sum(n for seq, n in zip(self.seqs, self.num_tokens) if seq.num_uncomputed > 1)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                self._preempt(self.running.pop())
                preempted = True
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.WAITING:
                break
            self.blocks.grow(seq, seq.num_computed + n)
            batch.add(seq, n)
            budget -= n
            i += 1
        # After a preemption the cache is full: admitting new work now would only preempt again.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = self.blocks.admit(seq, budget)      # starts after the prefix already in the cache
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
