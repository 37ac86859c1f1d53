"""The only part that touches the device: weights, KV cache, delta slots, and one forward pass per step."""
from __future__ import annotations

import torch

from deltaserve.delta_store.checkpoint import Checkpoint
from deltaserve.engine.attention import AttentionMetadata
from deltaserve.engine.config import EngineConfig
from deltaserve.engine.decode_graphs import DecodeGraphs
from deltaserve.engine.kernel_warmup import warm_up_kernels
from deltaserve.engine.model import LlamaModel, check_supported, head_dim_of
from deltaserve.engine.scheduler import ScheduledBatch
from deltaserve.engine.sequence import Sequence
from deltaserve.engine.slot_bank import LoadPlan, SlotBank
from deltaserve.kernels.tables import upload_lists

_CPU_KV_BYTES = 1 << 30             # KV cache on CPU when num_kv_blocks is not given
_DEVICE_HEADROOM = 0.10             # fraction of device memory left for activations, logits and the allocator


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint):
        hf = checkpoint.config
        check_supported(hf, config.max_model_len)
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.bank = SlotBank(checkpoint.shapes(), config.max_slots, config.slot_bits_per_param, self.device,
                             self.dtype)
        self.model = LlamaModel(hf, self.bank, config.max_model_len, self.device, self.dtype)
        self.model.load_weights(checkpoint)
        self.model.use_delta_kernels(config.delta_kernels)
        self.backbone_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        kv_heads, head_dim = hf.num_key_value_heads, head_dim_of(hf)
        # K and V of one block in every layer.
        self.block_bytes = 2 * hf.num_hidden_layers * config.block_size * kv_heads * head_dim * self.dtype.itemsize
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        # One block past the block manager's: the scratch rows that padding rows of a decode graph write to.
        tokens = (self.num_blocks + 1) * config.block_size
        self.kv_caches = [
            (torch.zeros(tokens, kv_heads, head_dim, device=self.device, dtype=self.dtype),
             torch.zeros(tokens, kv_heads, head_dim, device=self.device, dtype=self.dtype))
            for _ in range(hf.num_hidden_layers)]
        self.kv_cache_bytes = self.num_blocks * self.block_bytes
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        graphs = config.cuda_graphs if config.cuda_graphs is not None else self.device.type == "cuda"
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.bank, config.block_size, config.max_model_len,
                                   config.max_num_seqs, self.num_blocks * config.block_size,
                                   config.exact_graph_after) if graphs else None
        warm = config.kernel_warmup if config.kernel_warmup is not None else (
            self.device.type == "cuda" and config.delta_kernels)
        covering = self.graphs is not None and config.exact_graph_after > 1
        self.warmup_launches = warm_up_kernels(self.model, self.kv_caches[0], config.block_size,
                                               covering) if warm else 0
        if self.graphs is not None and self.device.type == "cuda":
            self.graphs.capture_base()   # after the kernel warm-up, so no capture waits on a compile

    def write_plan(self, plan: LoadPlan) -> None:
        """A planned load's copies (SlotBank.write_plan) from the calling thread, done when this returns. On CUDA
        they run on their own stream, straight from the host tier's page-locked buffer into the slot, so a
        tenant's load overlaps other tenants' decoding instead of queueing in front of it."""
        if self._copy_stream is None:
            self.bank.write_plan(plan)
            return
        # Steps run on the default stream, and so does what the copies must follow: a step thread's load that
        # grew a buffer copies the old one into the new there (the plan's views are of the new one), and the
        # plan's constants (zeros, ranks) were filled there by this thread. Queued, not waited for on the host.
        self._copy_stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            self.bank.write_plan(plan)
        self._copy_stream.synchronize()

    def _blocks_from_memory(self) -> int:
        """Blocks that fit after the backbone and every delta slot filled to capacity (reserved now)."""
        if self.device.type != "cuda":
            return max(1, _CPU_KV_BYTES // self.block_bytes)
        free, total = torch.cuda.mem_get_info(self.device)
        reserved_slots = self.config.max_slots * self.bank.capacity_bytes
        usable = free - reserved_slots - _DEVICE_HEADROOM * total
        if usable < self.block_bytes:
            raise ValueError(f"no device memory left for the KV cache: {free / 2**30:.1f} GiB free, delta slots "
                             f"reserve {reserved_slots / 2**30:.1f} GiB; lower max_slots or slot_bits_per_param")
        return int(usable // self.block_bytes)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None,
                                                  list[tuple[Sequence, torch.Tensor]]]:
        """Feed every scheduled chunk; returns the sequences that sample now, their fp32 logits [B, vocab], and for
        each sequence scoring its prompt (prompt_logprobs) the fp32 logits [k, vocab] that predict its next k
        unscored prompt tokens."""
        seqs, lens = batch.seqs, batch.num_tokens
        if self.graphs is not None and all(n == 1 and seq.num_computed + 1 == len(seq) for seq, n in zip(seqs, lens)):
            slots = [seq.slot for seq in seqs]
            if self.graphs.can_run(slots):
                return seqs, self.graphs.run([seq.token_ids[-1] for seq in seqs], [len(seq) for seq in seqs],
                                             [seq.block_table for seq in seqs], slots), []
        token_ids = [t for seq, n in zip(seqs, lens) for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        attn = AttentionMetadata.build(lens, [seq.num_computed + n for seq, n in zip(seqs, lens)],
                                       [seq.block_table for seq in seqs], self.config.block_size, self.device)
        rows = self.bank.rows([seq.slot for seq, n in zip(seqs, lens) for _ in range(n)])
        # A chunk that reaches the end of its sequence's tokens samples the next token from its last row.
        last_rows, sampling = [], []
        end = 0
        for seq, n in zip(seqs, lens):
            end += n
            if seq.num_computed + n == len(seq):
                last_rows.append(end - 1)
                sampling.append(seq)
        # Every piece of step metadata is made from host lists and uploaded without waiting for the device: the
        # only sync of a step is the sampler's read of the tokens.
        all_decodes = len(last_rows) == len(token_ids)      # every row samples: the same rows, the same metadata
        sample_rows = rows if all_decodes else self.bank.rows([seq.slot for seq in sampling])
        ids, picks = upload_lists([token_ids, last_rows], self.device)
        hidden = self.model(ids, self.kv_caches, attn, rows)
        prompt_logits = self._prompt_logits(seqs, lens, hidden)
        if not sampling:
            return [], None, prompt_logits
        picked = hidden if all_decodes else hidden.index_select(0, picks)
        return sampling, self.model.logits(picked, sample_rows), prompt_logits

    def _prompt_logits(self, seqs: list[Sequence], lens: list[int], hidden: torch.Tensor
                       ) -> list[tuple[Sequence, torch.Tensor]]:
        """Logits of the chunk rows that predict a prompt token not yet scored, for sequences that want
        prompt_logprobs: row p of a chunk predicts token p + 1 (a recomputed chunk after preemption scores
        nothing twice)."""
        wanted, chunk_rows, slots = [], [], []
        start = 0
        for seq, n in zip(seqs, lens):
            if seq.prompt_logprobs is not None:
                first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)    # position predicting the next unscored
                last = min(seq.num_computed + n, seq.num_prompt_tokens - 1)     # the last prompt token predicts none
                if first < last:
                    wanted.append((seq, last - first))
                    chunk_rows += range(start + first - seq.num_computed, start + last - seq.num_computed)
                    slots += [seq.slot] * (last - first)
            start += n
        if not wanted:
            return []
        (at,) = upload_lists([chunk_rows], self.device)
        logits = self.model.logits(hidden.index_select(0, at), self.bank.rows(slots))
        return list(zip([seq for seq, _ in wanted], logits.split([k for _, k in wanted])))
