"""KV-cache blocks: reference counts, each sequence's block table, and a prefix cache of full blocks
(pure Python; the cache tensors live in the model runner).

A full block is named by a hash of its tenant (slot and the slot's load generation: the same tokens give
different K/V under another delta) and of every token up to its end, so sequences of one tenant with a
common prefix share that prefix's blocks. A freed block keeps its K/V and its name until it is handed out
again, oldest freed first, so a later request, or a preempted one when it is recomputed, can still find it.
"""
from __future__ import annotations

from collections import OrderedDict

from deltaserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self._block_of: dict[int, int] = {}                 # name -> block
        self._name_of: dict[int, tuple[int, tuple[int, ...]]] = {}   # block -> (name, its tokens, to rule out
        #                                                                 a hash collision)
        self.num_cached_tokens = 0                          # prompt tokens served from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold KV for ``num_tokens`` in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {needed} KV blocks, {len(self._free)} free")
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            seq.block_table.append(block)

    def admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a sequence without KV its cached prefix plus blocks for up to ``budget`` more tokens.

        Returns the tokens it feeds this step, or None (nothing changed) when the blocks are not there.
        """
        prefix = self._cached_prefix(seq)
        cached = len(prefix) * self.block_size
        n = min(len(seq) - cached, budget)
        needed = -(-(cached + n) // self.block_size) - len(prefix)
        revived = sum(1 for b in prefix if self._refs[b] == 0)     # cached but free: taken from the free list
        if needed + revived > len(self._free):
            return None
        for block in prefix:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        seq.block_table = prefix
        seq.num_computed = cached
        self.num_cached_tokens += cached
        self.grow(seq, cached + n)
        return n

    def register(self, seq: Sequence) -> None:
        """Name the blocks ``seq`` has filled since the last call, so later sequences can share them."""
        for i in range(len(seq.block_names), seq.num_computed // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            name = hash((seq.block_names[-1] if seq.block_names else hash(seq.cache_key), tokens))
            seq.block_names.append(name)
            block = seq.block_table[i]
            if name not in self._block_of and block not in self._name_of:
                self._block_of[name] = block
                self._name_of[block] = (name, tokens)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so they are reused before the (more shareable) head of the prefix.
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.block_names = []

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix; never the last token, which must be fed to sample from. None for a
        request that scores its prompt (prompt_logprobs): every prompt token must pass through the model."""
        blocks: list[int] = []
        if seq.prompt_logprobs is not None:
            return blocks
        name = hash(seq.cache_key)
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            name = hash((name, tokens))
            block = self._block_of.get(name)
            if block is None or self._name_of[block][1] != tokens:
                break
            blocks.append(block)
        return blocks

    def _forget(self, block: int) -> None:
        named = self._name_of.pop(block, None)
        if named is not None:
            del self._block_of[named[0]]
