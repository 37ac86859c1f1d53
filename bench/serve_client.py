"""The load generator: streamed chat requests through the official openai AsyncOpenAI client, timed per token.

A token's arrival is the arrival of a stream chunk with a choice: the server sends one per generated token,
except for a token that ends mid-character (its text comes with the next), so chunk gaps are the
inter-token latencies a user sees, and the first chunk (role + first token) always marks the first token.
Usage comes from the final chunk (stream_options.include_usage), so token counts are the server's, and
time per output token (report) is exact even where chunks merged tokens.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import openai

from load_schedule import Arrival
from serve_tenants import tenant_name


@dataclass(slots=True)
class RequestResult:
    tenant: int
    scheduled: float                 # seconds after the run start
    start: float = 0.0               # when it was sent (after the run start)
    ttft: float | None = None        # seconds from sending to the first content chunk
    end: float | None = None         # when the stream ended (after the run start)
    token_gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass(frozen=True, slots=True)
class RequestShape:
    messages: list[dict]
    max_tokens: int


def client(url: str, timeout_s: float) -> openai.AsyncOpenAI:
    # max_retries=0: a retried request would hide an error and double-count its latency.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=timeout_s)


async def timed_request(api: openai.AsyncOpenAI, result: RequestResult, shape: RequestShape, t0: float) -> None:
    """Send one streamed request for ``result.tenant`` and fill ``result`` in (errors included)."""
    result.start = time.perf_counter() - t0
    last = None
    try:
        stream = await api.chat.completions.create(
            model=tenant_name(result.tenant), messages=shape.messages,
            max_tokens=shape.max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # every request generates exactly max_tokens: a fixed shape
        )
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.completion_tokens = chunk.usage.completion_tokens
            if chunk.choices:
                if last is None:
                    result.ttft = now - result.start
                else:
                    result.token_gaps.append(now - last)
                last = now
        result.end = time.perf_counter() - t0
    except (openai.OpenAIError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_schedule(url: str, schedule: list[Arrival], shape: RequestShape, drain_s: float,
                       timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send each arrival at its time (open loop), wait up to ``drain_s`` after the last for stragglers
    (they count as errors). Returns the results and the wall time from the start to the last response."""
    api = client(url, timeout_s)
    results = [RequestResult(a.tenant, a.at) for a in schedule]
    t0 = time.perf_counter()

    async def fire(result: RequestResult) -> None:
        await asyncio.sleep(max(0.0, result.scheduled - (time.perf_counter() - t0)))
        await timed_request(api, result, shape, t0)

    tasks = [asyncio.create_task(fire(r)) for r in results]
    horizon = (schedule[-1].at if schedule else 0.0) + drain_s
    done, pending = await asyncio.wait(tasks, timeout=horizon)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for r in results:
        if r.end is None and r.error is None:
            r.error = "unfinished at the drain deadline"
    await api.close()
    ends = [r.end for r in results if r.end is not None]
    return results, (max(ends) if ends else time.perf_counter() - t0)



async def single(url: str, tenant: int, shape: RequestShape, timeout_s: float) -> RequestResult:
    """One request with the server otherwise idle: latency without queueing (warm-up, cold-load probes)."""
    api = client(url, timeout_s)
    result = RequestResult(tenant, 0.0)
    await timed_request(api, result, shape, time.perf_counter())
    await api.close()
    return result
