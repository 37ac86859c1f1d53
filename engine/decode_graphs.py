"""CUDA graphs for decode steps: the decoder and the head replayed as one launch per padded batch size.

Python issues some twenty launches per layer; at small batches that host time, not the GPU, sets the step
time (H100, batch 1: ~70 ms a step for SmolLM2 and for a 7B alike, bench/results/engine_decode_*). A
decode step whose tenant rows all take the Triton kernels is padded to the next bucket size P and replayed
from a graph captured for (P, its row tiles and which delta kernels they need) under the slot bank's current
layout. Per step only inputs move: the embedded tokens (the embedding and its per-tenant delta run eagerly,
outside the graph), positions, cache slots, block tables, context lengths and slot metadata are copied into
the graph's static tensors. Padding rows are base rows of context 0 writing K/V to a scratch cache row.

A capture costs a few eager steps plus the capture itself, on the step thread, stalling every running sequence
once (~0.25 s at 7B). So, as vLLM does, the base-model graph of every bucket is captured before the engine takes
requests (capture_base), and base graphs, which read no slot buffer, outlive slot-layout changes. Steps with
tenant rows need slot buffers, so their graphs are captured on use and again after a layout change; and a
serving batch's mix of tenants changes which kernel variants its rows take (decode or tl.dot tiles, rows a tile),
so a key per mix alone would keep capturing. A bucket's first tenant step therefore captures its covering graph,
which launches every variant (DeltaRows.launch_every_variant) on 16-row tiles enough for any mix and replays any
mix, and a mix gets a graph of its own only once it has come exact_after times under the layout: without the
covering graph's idle launches, and on the mix's own row tiles (SlotMetadata.from_host's fit_tiles), so a
tenant's 17-64 rows read its delta once and each launch takes the config of its real tile count.
captures and capture_seconds count the captures, covering_steps the steps replayed by covering graphs (the
server exports all three).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deltaserve.engine.attention import DecodeAttention
from deltaserve.engine.model import LlamaModel
from deltaserve.engine.slot_bank import DeltaRows, SlotBank
from deltaserve.kernels.paged_attention import live_workspaces
from deltaserve.kernels.tables import live_tables, upload_lists


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes that get a graph: fine steps where padding would cost most, coarser above."""
    sizes = [1, 2, 4, 8] + list(range(16, 64, 16)) + list(range(64, 256, 32)) + list(range(256, max_num_seqs, 64))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


@dataclass
class _Graph:
    """One captured step: its static inputs, its output, and what must outlive it."""

    hidden: torch.Tensor                   # [P, hidden] embedded tokens (input)
    attn: DecodeAttention                  # input
    rows: DeltaRows | None                 # input; None: every row is the base model
    logits: torch.Tensor | None = None     # fp32 [P, vocab] (output, rewritten by every replay)
    graph: torch.cuda.CUDAGraph | None = None   # None off CUDA: the same static-shaped step, run eagerly
    keep: list = field(default_factory=list)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], bank: SlotBank,
                 block_size: int, max_model_len: int, max_num_seqs: int, scratch_row: int, exact_after: int = 1):
        if exact_after < 1:
            raise ValueError(f"exact_after must be >= 1, got {exact_after}")
        self.model, self.kv_caches, self.bank = model, kv_caches, bank
        self.exact_after = exact_after      # 1: every mix its own graph at once, no covering graphs
        self.block_size, self.scratch_row = block_size, scratch_row
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = decode_buckets(max_num_seqs)
        self.device = bank.device
        self._graphs: dict[tuple[int, tuple | None], _Graph] = {}   # (P, DeltaRows.graph_key or None)
        self._seen: dict[tuple[int, tuple], int] = {}   # steps of each tenant key without a graph of its own
        self._layout: tuple | None = None
        self._pool = None
        # One side stream for every capture's warm-up: torch keeps a cuBLAS workspace per (handle, stream) for the
        # process's life, so a fresh stream per capture held ~30 MB more each. A 7B engine's 10 base graphs took
        # 0.51 GB of device memory that way, 0.21 GB with one stream (H100; free memory after building the engine
        # with and without them, each in its own process), and the 64th 1-bit tenant no longer fit
        # (bench/results/serve.md).
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.captures = 0                   # graphs captured so far (a new layout recaptures)
        self.capture_seconds = 0.0          # wall time of those captures, warm-up steps included
        self.covering_steps = 0             # steps replayed by a covering graph

    def can_run(self, row_slots: list[int]) -> bool:
        """Whether a decode step of these rows can replay a graph: no slot takes the per-slot torch path."""
        return len(row_slots) <= self.buckets[-1] and not any(
            self.bank.torch_applied(s) for s in set(row_slots) if s >= 0)

    @torch.inference_mode()
    def run(self, token_ids: list[int], ctx_lens: list[int], block_tables: list[list[int]],
            row_slots: list[int]) -> torch.Tensor:
        """fp32 logits [B, vocab] of one decode step (row i: token_ids[i] at position ctx_lens[i] - 1)."""
        n = len(token_ids)
        pad_to = next(b for b in self.buckets if b >= n)
        layout = self.bank.layout_key()
        if layout != self._layout:          # a slot buffer moved or a kind appeared: tenant graphs are stale
            self.drop_tenant_graphs()
            self._layout = layout
        (ids,) = upload_lists([token_ids], self.device)
        embedding = self.model.embed_tokens
        embed_rows = (self.bank.rows(row_slots)
                      if any(embedding.slots.kinds[s] for s in set(row_slots) if s >= 0) else None)
        hidden = embedding(ids, embed_rows)
        attn = DecodeAttention.build(ctx_lens, block_tables, self.block_size, pad_to, self.max_blocks,
                                     self.scratch_row, self.device)
        tenants = any(s >= 0 for s in row_slots)
        rows = self.bank.static_rows(row_slots, pad_to, fit_tiles=True) if tenants else None
        key = (pad_to, None if rows is None else rows.graph_key())
        g = self._graphs.get(key)
        if g is None and rows is not None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.exact_after:
                rows = self.bank.static_rows(row_slots, pad_to).launch_every_variant()
                key = (pad_to, rows.graph_key())
                g = self._graphs.get(key)
                self.covering_steps += 1
        if g is None:
            g = self._graphs[key] = self._capture(pad_to, attn, rows)
        else:
            g.attn.copy_(attn)
            if rows is not None:
                g.rows.copy_(rows)
        g.hidden[:n].copy_(hidden)
        if g.graph is None:
            g.logits = self._step(g)
        else:
            g.graph.replay()
        return g.logits[:n]

    def drop_tenant_graphs(self) -> None:
        """Forget every graph with tenant rows and how often each tenant mix came (base graphs stay)."""
        for key in [k for k in self._graphs if k[1] is not None]:
            del self._graphs[key]
        self._seen.clear()
        if not self._graphs:
            # A fresh memory pool too: the old one outlives its graphs while a returned logits view still holds a
            # block of it, and the allocator refuses a capture into a pool whose graphs are all gone.
            self._pool = None

    @torch.inference_mode()
    def capture_base(self) -> None:
        """Capture the base-model graph of every bucket now (all rows padding: they write only the scratch row)."""
        for pad_to in self.buckets:
            if (pad_to, None) not in self._graphs:
                attn = DecodeAttention.build([], [], self.block_size, pad_to, self.max_blocks, self.scratch_row,
                                             self.device)
                self._graphs[(pad_to, None)] = self._capture(pad_to, attn, None)

    def _step(self, g: _Graph) -> torch.Tensor:
        return self.model.logits(self.model.decoder(g.hidden, self.kv_caches, g.attn, g.rows), g.rows)

    def _capture(self, pad_to: int, attn: DecodeAttention, rows: DeltaRows | None) -> _Graph:
        """A graph over this step's inputs, which become its static tensors. Off CUDA nothing is captured."""
        g = _Graph(torch.zeros(pad_to, self.model.config.hidden_size, device=self.device,
                               dtype=self.model.embed_tokens.weight.dtype), attn, rows)
        if self.device.type != "cuda":
            return g
        start = time.perf_counter()
        # Warm up on a side stream first: Triton autotuning and the libraries' first-call setup must not run
        # inside the capture. The warm-up writes this step's K/V; the replay rewrites the same rows.
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            for _ in range(2):
                self._step(g)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        g.graph = torch.cuda.CUDAGraph()
        # thread_local: a tenant's delta written by another thread (AsyncEngine.load_delta) may copy and allocate
        # on its own stream meanwhile; the default mode would fail the capture on that.
        with torch.cuda.graph(g.graph, pool=self._pool, capture_error_mode="thread_local"):
            g.logits = self._step(g)
        self._pool = g.graph.pool()
        g.keep = live_tables() + live_workspaces()   # the graph's addresses must outlive the kernels' caches
        self.captures += 1
        torch.cuda.synchronize(self.device)   # the warm-up steps ran on the GPU meanwhile: count them
        self.capture_seconds += time.perf_counter() - start
        return g
