"""Stop work for clients that have gone away before their answer started.

A stream notices a disconnect itself (Starlette cancels it). A whole (non-streamed) answer, or the wait for
a stream's first token (which may include queueing for a delta slot), has nothing to send until the end,
so the connection is polled meanwhile; cancelling the work closes the generation, which aborts its
sequences in the engine and releases the slot.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

from .errors import APIError

T = TypeVar("T")
# How long a gone client's sequences may keep running: short enough to save decode steps, long enough
# that polling costs nothing measurable.
POLL_SECONDS = 0.5


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of ``work``; cancelled (and 499, nginx's "client closed request") if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "Client closed the request before the answer was ready.",
                               code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
