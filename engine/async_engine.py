"""AsyncEngine: the server's view of the engine. Steps run in one background thread (torch releases the
GIL during kernels), so the event loop keeps serving HTTP while the model computes; outputs cross back to
the loop with call_soon_threadsafe. Delta loads run on that thread too, between two steps (see load_delta)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any, Callable, TypeVar

from deltaserve.delta_store.format import DeltaFile
from deltaserve.engine.config import EngineConfig, SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """A step failed; the requests that were in flight are ended with this error."""


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self._engine = LLMEngine(config)
        self.config = config
        self.tokenizer = self._engine.tokenizer
        self.base_fingerprint: str = self._engine.base_fingerprint
        self.base_shapes: dict[str, tuple] = self._engine.base_shapes
        self.model_name: str = self._engine.model_name
        self.vocab_size: int = self._engine.vocab_size
        # `_lock` guards the engine (steps, delta loads); `_wake` signals new work or stop to the step thread.
        self._lock = threading.Lock()
        self._wake = threading.Condition(threading.Lock())
        self._inbox: list[tuple[str, Any]] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ---- requests ----------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       slot: int = -1) -> AsyncIterator[RequestOutput]:
        """Output deltas of one request until it finishes; leaving the loop early (client gone) aborts it."""
        if self._thread is None:
            raise RuntimeError("the engine is not started (await engine.start())")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self._engine.validate(prompt_token_ids, params, slot)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._post("add", (request_id, list(prompt_token_ids), params, slot))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def _post(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._inbox.append((kind, payload))
            self._wake.notify()

    # ---- deltas and stats (callable from any thread) -----------------------------------------------
    def load_delta(self, slot: int, delta: DeltaFile) -> None:
        """Copy a delta into a slot no running request uses; returns once it is there.

        A load is thousands of small torch calls, each releasing the GIL, and a thread that must win the GIL
        back from a busy one waits up to a switch interval per call: run by the loader beside a busy step
        thread, loads took ~18 s instead of ~0.3 s (H100, SmolLM2, 1000 tenants), and run on the step thread
        they paused decoding for seconds. So this thread (the caller's) plans the copies into the slot's views
        and does them as one torch call, from the host tier's page-locked buffer on a side stream, while steps
        go on: no step reads the slot until it is committed. The step thread then only commits the slot's host
        state between two steps (or does the whole load, when a buffer must grow first)."""
        plan = self._engine.plan_load(slot, delta)
        if plan is not None:
            self._engine.write_planned(plan)
        self._on_step_thread(lambda: self._engine.load_planned(slot, delta, plan))

    def check_delta(self, delta: DeltaFile) -> None:
        """Raise ValueError if `delta` could not go into a slot of this engine (base, shapes, capacity).

        The registry calls it before an upload becomes a tenant's current version, so a delta that would
        fail at its first request is refused at upload instead."""
        self._engine.check_delta(0, delta)

    def clear_slot(self, slot: int) -> None:
        self._on_step_thread(lambda: self._engine.clear_slot(slot))

    def slot_bytes(self, delta: DeltaFile) -> int:
        return self._engine.slot_bytes(delta)

    def stats(self) -> EngineStats:
        # Read without the lock so /metrics never waits for a step; counters may be one step apart.
        return self._engine.stats()

    def _on_step_thread(self, fn: Callable[[], T]) -> T:
        """fn's result, run by the step thread between steps (under the engine lock here when it is not running)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            queued = self._thread is not None and not self._stopping
            if queued:
                self._inbox.append(("call", (fn, done)))
                self._wake.notify()
        if not queued:
            with self._lock:
                return fn()
        return done.result()

    # ---- the step thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._stopping or self._engine.has_work()):
                    self._wake.wait()
                if self._stopping:
                    break
            with self._lock:
                # Take the inbox under the engine lock: an abort posted before a delta load into its slot is
                # applied before the next step, so an aborted row never runs with another tenant's delta.
                with self._wake:
                    inbox, self._inbox = self._inbox, []
                outputs = self._apply(inbox)
                try:
                    outputs += self._engine.step()
                except Exception as exc:        # noqa: BLE001 - every waiter must hear about it
                    log.exception("engine step failed")
                    self._fail_all(exc)
            self._deliver(outputs)
        with self._lock:
            with self._wake:        # posted before the stop: calls still run, requests hear the engine stopped
                inbox, self._inbox = self._inbox, []
            self._apply([(kind, p) for kind, p in inbox if kind == "call"])
            for kind, payload in inbox:
                if kind == "add":
                    self._deliver_one(payload[0], EngineDeadError("the engine stopped"))
            self._fail_all(EngineDeadError("the engine stopped"))

    def _apply(self, inbox: list[tuple[str, Any]]) -> list[RequestOutput]:
        outputs = []
        for kind, payload in inbox:
            if kind == "call":
                fn, done = payload
                try:
                    done.set_result(fn())
                except Exception as exc:        # noqa: BLE001 - the caller re-raises it
                    done.set_exception(exc)
            elif kind == "add":
                request_id = payload[0]
                try:
                    self._engine.add_request(*payload)
                except ValueError as exc:
                    self._deliver_one(request_id, exc)
            else:
                out = self._engine.abort(payload)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._engine.seqs):
            self._engine.abort(request_id)
            self._deliver_one(request_id, EngineDeadError(f"engine error: {exc}"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver_one(out.request_id, out)

    def _deliver_one(self, request_id: str, item: RequestOutput | BaseException) -> None:
        def put() -> None:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(item)
        self._loop.call_soon_threadsafe(put)
