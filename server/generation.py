"""Run one API request on the engine: take the tenant's delta slot, start one sequence per choice, merge
their outputs as they come, record metrics, and on any exit (finished, error, client gone) abort what is
still running and give the slot back.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import AsyncIterator

from deltaserve.engine import SamplingParams

from .errors import APIError, bad_request, model_not_found
from .metrics import ServingMetrics


@dataclass(slots=True)
class GenerationJob:
    request_id: str
    model: str                  # the name the client asked for; the metrics label
    tenant: str | None          # None: the base model, no delta
    prompts: list[list[int]]    # token ids, one list per prompt
    params: SamplingParams
    n: int                      # choices per prompt
    arrival: float = dataclasses.field(default_factory=time.monotonic)

    def choice_params(self, choice: int) -> SamplingParams:
        # n choices with one seed would be n copies of one answer; offset the seed per choice instead.
        if self.params.seed is None or choice == 0:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + choice)


@dataclass(slots=True)
class _SequenceEnd:
    index: int


class Generator:
    def __init__(self, engine, cache, metrics: ServingMetrics):
        self.engine = engine
        self.cache = cache
        self.metrics = metrics

    async def run(self, job: GenerationJob) -> AsyncIterator[tuple[int, object]]:
        """Yield ``(choice index, RequestOutput)``; choice index = prompt index * n + choice (OpenAI's order)."""
        label = job.model
        first_token_seen = False
        slot = -1
        tasks: list[asyncio.Task] = []
        unfinished: set[int] = set()
        last_seen: dict[int, float] = {}
        try:
            if job.tenant is not None:
                slot = await self._acquire(job)
            queue: asyncio.Queue = asyncio.Queue()
            for p, prompt in enumerate(job.prompts):
                for c in range(job.n):
                    index = p * job.n + c
                    unfinished.add(index)
                    tasks.append(asyncio.create_task(
                        self._pump(index, f"{job.request_id}-{index}", prompt, job.choice_params(c), slot, queue)))
            while unfinished:
                item = await queue.get()
                if isinstance(item, ValueError):  # the engine refused the request (it validates first)
                    raise bad_request(str(item)) from item
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _SequenceEnd):
                    # The engine stream ended without a finished output: only an engine abort does that.
                    unfinished.discard(item.index)
                    continue
                index, out = item
                now = time.monotonic()
                if out.new_token_ids:
                    if not first_token_seen:
                        first_token_seen = True
                        self.metrics.ttft.labels(label).observe(now - job.arrival)
                    elif index in last_seen:
                        gap = (now - last_seen[index]) / len(out.new_token_ids)
                        self.metrics.itl.labels(label).observe(gap)
                    last_seen[index] = now
                if out.finished:
                    unfinished.discard(index)
                    self._count_finished(label, out, prompt_counted=index % job.n == 0)
                yield index, out
            self.metrics.e2e.labels(label).observe(time.monotonic() - job.arrival)
        finally:
            for task in tasks:
                task.cancel()
            # Abort now rather than when the cancelled pumps next run: the engine applies aborts before its
            # next step, so no aborted row ever runs with a delta loaded into the slot released below.
            for index in unfinished:
                self.engine.abort(f"{job.request_id}-{index}")
                self.metrics.finished.labels(label, "abort").inc()
            if slot >= 0:
                self.cache.release(job.tenant, slot)

    async def _acquire(self, job: GenerationJob) -> int:
        try:
            return await self.cache.acquire(job.tenant)
        except LookupError:  # deleted (or emptied) since the request was checked
            raise model_not_found(job.model) from None
        except ValueError as exc:  # the stored delta does not fit this engine's slots
            raise APIError(500, f"The delta of '{job.model}' could not be loaded: {exc}", type="server_error",
                           code="delta_load_failed") from exc

    async def _pump(self, index: int, request_id: str, prompt: list[int], params: SamplingParams, slot: int,
                    queue: asyncio.Queue) -> None:
        try:
            async for out in self.engine.generate(request_id, prompt, params, slot=slot):
                queue.put_nowait((index, out))
            queue.put_nowait(_SequenceEnd(index))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaced to the request's consumer, which answers with an error
            queue.put_nowait(exc)

    def _count_finished(self, label: str, out, prompt_counted: bool) -> None:
        self.metrics.finished.labels(label, out.finish_reason or "stop").inc()
        self.metrics.completion_tokens.labels(label).inc(out.num_completion_tokens)
        if prompt_counted:  # n choices of one prompt process that prompt once
            self.metrics.prompt_tokens.labels(label).inc(out.num_prompt_tokens)
