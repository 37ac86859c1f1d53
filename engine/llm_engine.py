"""Synchronous engine: add requests, run steps, get per-request output deltas. Not thread-safe by itself;
AsyncEngine drives it from one thread."""
from __future__ import annotations

import dataclasses
import itertools

from pathlib import Path

import torch
from transformers import GenerationConfig

from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.format import DeltaFile
from deltaserve.engine.block_manager import BlockManager
from deltaserve.engine.config import EngineConfig, SamplingParams
from deltaserve.engine.detokenizer import Detokenizer, TextDecoder
from deltaserve.engine.model_runner import ModelRunner
from deltaserve.engine.outputs import EngineStats, FinishReason, RequestOutput, TokenLogprob, TopLogprob
from deltaserve.engine.sampler import logprobs, process_logits, sample
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.slot_bank import LoadPlan
from deltaserve.engine.sequence import Sequence


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        checkpoint = open_checkpoint(config.model)
        self.tokenizer = checkpoint.tokenizer()
        self.decode_text = TextDecoder(self.tokenizer)
        self.base_fingerprint = checkpoint.fingerprint()
        self.base_shapes = checkpoint.shapes()
        self.model_name = checkpoint.path.stem if checkpoint.path.is_file() else checkpoint.path.name
        self.runner = ModelRunner(config, checkpoint)
        self.vocab_size = checkpoint.config.vocab_size
        self.eos_token_ids = _eos_ids(checkpoint.config.eos_token_id, self.tokenizer.eos_token_id,
                                      _generation_eos(checkpoint.path))
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._request_count = itertools.count()      # seeds requests that bring no seed
        self._stats = EngineStats()

    # ---- requests ----------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, slot: int) -> None:
        """Raise ValueError for a request the engine cannot run; changes nothing."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.config.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this model serves at most {self.config.max_model_len} "
                             "(prompt + completion), leaving no room for a completion")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not -1 <= slot < self.config.max_slots:
            raise ValueError(f"slot {slot} outside [-1, {self.config.max_slots})")
        for name in ("logit_bias", "stop_token_ids"):
            if any(t >= self.vocab_size for t in getattr(params, name)):
                raise ValueError(f"{name} token ids must be in [0, {self.vocab_size})")
        longest = min(n + params.max_tokens, self.config.max_model_len)
        if -(-longest // self.config.block_size) > self.blocks.num_blocks:
            raise ValueError(f"{longest} tokens do not fit the KV cache ({self.blocks.num_blocks} blocks of "
                             f"{self.config.block_size})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, slot: int = -1) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params, slot)
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else hash((self.config.seed, next(self._request_count)))
            generator = torch.Generator(device=self.runner.device).manual_seed(seed & (2**63 - 1))
        detokenizer = Detokenizer(self.decode_text, prompt_token_ids, params.stop)
        generation = self.runner.bank.generation[slot] if slot >= 0 else 0
        seq = Sequence(request_id, prompt_token_ids, params, slot, generator, detokenizer, (slot, generation))
        if params.prompt_logprobs is not None:
            first = prompt_token_ids[0]
            seq.prompt_logprobs = [TokenLogprob(first, self.decode_text([first]), None)]
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; its final output (finish_reason "abort"), or None if unknown."""
        seq = self.seqs.get(request_id)
        return None if seq is None else self._finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        num_prefill = batch.num_prefill_tokens
        sampling, logits, prompt_logits = self.runner.run(batch)
        for seq, scores in prompt_logits:
            self._score_prompt(seq, scores)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            self.blocks.register(seq)
        self._record(batch.seqs, num_prefill)
        if not sampling:
            return []
        params = [s.params for s in sampling]
        shaped = process_logits(logits, params, [s.token_ids for s in sampling],
                                [s.num_prompt_tokens for s in sampling], self.eos_token_ids)
        tokens = sample(shaped, params, [s.generator for s in sampling])
        want = [s.params.logprobs for s in sampling if s.params.logprobs is not None]
        # One device-to-host copy for the whole batch, not one per row.
        lp = tuple(t.tolist() for t in logprobs(logits, tokens, max(want))) if want else None
        token_list = tokens.tolist()
        outputs = []
        for i, (seq, token) in enumerate(zip(sampling, token_list)):
            if seq.params.max_tokens == 0:   # scoring only: done once the prompt is scored; the token is dropped
                outputs.append(self._finish(seq, "length", seq.prompt_logprobs))
                continue
            entry = self._logprob_entry(lp, i, token, seq.params.logprobs) if lp is not None else None
            outputs.append(self._append(seq, token, entry))
        return outputs

    def _append(self, seq: Sequence, token: int, entry: TokenLogprob | None) -> RequestOutput:
        params = seq.params
        seq.token_ids.append(token)
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        reason: FinishReason | None = None
        if seq.detokenizer.add(token, hidden=is_stop_token) or is_stop_token:
            reason = "stop"
        elif seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.config.max_model_len:
            reason = "length"
        if reason is not None:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.finish(seq)
        return self._output(seq, [token], [entry] if entry else None, reason,
                            seq.prompt_logprobs if seq.num_completion_tokens == 1 else None)

    def _finish(self, seq: Sequence, reason: FinishReason,
                prompt_logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """End a request with no new token (an abort, or a scoring-only request with its prompt's logprobs)."""
        self.seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return self._output(seq, [], None, reason, prompt_logprobs)

    def _output(self, seq: Sequence, tokens: list[int], lps: list[TokenLogprob] | None,
                reason: FinishReason | None, prompt_logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, tokens, seq.detokenizer.take(reason is not None), lps,
                             reason is not None, reason, seq.num_prompt_tokens, seq.num_completion_tokens,
                             prompt_logprobs)

    def _score_prompt(self, seq: Sequence, scores: torch.Tensor) -> None:
        """Append the entries of the prompt tokens that `scores` (fp32 [k, vocab], from ModelRunner.run) predict."""
        done = len(seq.prompt_logprobs)
        tokens = seq.token_ids[done:done + scores.shape[0]]
        chosen = torch.tensor(tokens, device=scores.device)
        lp = tuple(t.tolist() for t in logprobs(scores, chosen, seq.params.prompt_logprobs))
        seq.prompt_logprobs += [self._logprob_entry(lp, i, token, seq.params.prompt_logprobs)
                                for i, token in enumerate(tokens)]

    def _logprob_entry(self, lp: tuple[list, list, list], row: int, token: int,
                       top_n: int | None) -> TokenLogprob | None:
        """lp: host lists (chosen [B], top values [B][n], top ids [B][n]) from sampler.logprobs."""
        if top_n is None:
            return None
        chosen, top_values, top_ids = lp
        top = [TopLogprob(t, self.decode_text([t]), v)
               for t, v in zip(top_ids[row][:top_n], top_values[row][:top_n])]
        return TokenLogprob(token, self.decode_text([token]), chosen[row], top)

    def _record(self, seqs: list[Sequence], num_prefill: int) -> None:
        s = self._stats
        s.last_batch_size = len(seqs)
        s.last_distinct_slots = len({seq.slot for seq in seqs})
        s.last_num_prefill_tokens = num_prefill
        s.steps_total += 1

    # ---- deltas and stats --------------------------------------------------------------------------
    def check_delta(self, slot: int, delta: DeltaFile) -> None:
        """Raise ValueError if `delta` cannot go into `slot`; changes nothing."""
        if delta.base_fingerprint != self.base_fingerprint:
            raise ValueError(f"delta was made for base {delta.base_fingerprint}, this engine serves "
                             f"{self.base_fingerprint}")
        self.runner.bank.check(slot, delta)

    def load_delta(self, slot: int, delta: DeltaFile) -> None:
        self.check_delta(slot, delta)
        self.runner.bank.load(slot, delta)

    def plan_load(self, slot: int, delta: DeltaFile) -> LoadPlan | None:
        """Checked plan of `delta` (on the host or the device) as one batched copy into `slot` (SlotBank.plan_load);
        safe while steps run."""
        self.check_delta(slot, delta)
        return self.runner.bank.plan_load(slot, delta)

    def write_planned(self, plan: LoadPlan) -> None:
        """A plan's copies, done when this returns (ModelRunner.write_plan); safe while steps run, as long as no
        scheduled sequence uses plan.slot."""
        self.runner.write_plan(plan)

    def load_planned(self, slot: int, delta: DeltaFile, plan: LoadPlan | None) -> None:
        """Between steps: commit a planned load (writing its copies first if no thread did) if the plan still
        applies, else load in full."""
        if plan is not None and not plan.written:
            self.write_planned(plan)
        if plan is None or not self.runner.bank.commit_plan(plan):
            self.load_delta(slot, delta)

    def clear_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.max_slots:
            raise ValueError(f"slot {slot} outside [0, {self.config.max_slots})")
        self.runner.bank.clear(slot)

    def slot_bytes(self, delta: DeltaFile) -> int:
        return self.runner.bank.slot_bytes(delta)

    def stats(self) -> EngineStats:
        s = self._stats
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        s.num_running, s.num_waiting = len(running), len(waiting)
        s.running_slots = sorted({seq.slot for seq in running})
        s.waiting_slots = sorted({seq.slot for seq in waiting})
        s.kv_blocks_used, s.kv_blocks_total = self.blocks.num_used, self.blocks.num_blocks
        s.backbone_bytes = self.runner.backbone_bytes
        s.delta_slot_bytes = self.runner.bank.nbytes()
        s.kv_cache_bytes = self.runner.kv_cache_bytes
        graphs = self.runner.graphs
        if graphs is not None:
            s.graph_captures, s.graph_capture_seconds = graphs.captures, graphs.capture_seconds
            s.graph_covering_steps = graphs.covering_steps
        return dataclasses.replace(s)


def _generation_eos(path: Path) -> int | list[int] | None:
    """EOS ids of generation_config.json: chat models list their end-of-turn token there (Llama 3 Instruct)."""
    if not (path / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(path).eos_token_id


def _eos_ids(*values: int | list[int] | None) -> set[int]:
    ids: set[int] = set()
    for v in values:
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(v)
    return ids
