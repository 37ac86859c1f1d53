"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process never collide).

Request counters and latency histograms are updated as requests run. Engine and tier state (queue
lengths, batch shape, KV usage, device memory) is read from ``engine.stats()`` and ``cache.stats()`` at
scrape time, so it is never stale and costs nothing between scrapes.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds. Decode steps on a GPU are ~10-50 ms, prefill of long prompts and cold delta loads take seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("deltaserve_requests", "Inference requests received, per tenant (model) and endpoint.",
                                ["tenant", "endpoint"], registry=r)
        self.errors = Counter("deltaserve_request_errors", "Requests answered with an error, per tenant and status.",
                              ["tenant", "status"], registry=r)
        self.finished = Counter("deltaserve_sequences_finished", "Sequences finished, per tenant and finish reason "
                                "(stop, length, abort).", ["tenant", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens processed, per tenant.", ["tenant"],
                                     registry=r)
        self.completion_tokens = Counter("deltaserve_completion_tokens", "Completion tokens generated, per tenant.",
                                         ["tenant"], registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "From request arrival to its first token "
                              "(includes waiting for the tenant's delta to load).", ["tenant"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("deltaserve_inter_token_latency_seconds", "Gap between consecutive tokens of a sequence.",
                             ["tenant"], buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("deltaserve_e2e_request_latency_seconds", "From request arrival to its last token.",
                             ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tier_events = Counter("deltaserve_delta_tier_events", "Delta tier events: hit, miss, load, eviction, "
                                   "per tier (host, gpu).", ["tier", "event"], registry=r)
        self.load_seconds = Histogram("deltaserve_delta_load_seconds", "Time to bring a delta into a tier.", ["tier"],
                                      buckets=_LATENCY_BUCKETS, registry=r)

    def tier_event(self, event) -> None:
        """DeltaCache's metrics callback (a CacheEvent; may come from a load thread: counters are thread-safe)."""
        self.tier_events.labels(event.tier, event.kind).inc()
        if event.kind == "load":
            self.load_seconds.labels(event.tier).observe(event.seconds)

    def attach(self, engine_stats: Callable[[], Any], cache_stats: Callable[[], Any]) -> None:
        """Read engine and tier state at scrape time (called once the engine is up)."""
        self.registry.register(_StateCollector(engine_stats, cache_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, engine_stats, cache_stats):
        self.engine_stats = engine_stats
        self.cache_stats = cache_stats

    def describe(self):
        # Values come from live objects; describing nothing keeps registration from calling collect() early.
        return []

    def collect(self):
        s = self.engine_stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("deltaserve_num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("deltaserve_num_requests_waiting", "Sequences queued for the engine.", s.num_waiting)
        yield gauge("deltaserve_batch_size", "Sequences in the last engine step.", s.last_batch_size)
        yield gauge("deltaserve_batch_distinct_tenants", "Distinct delta slots (tenants) in the last engine step.",
                    s.last_distinct_slots)
        yield gauge("deltaserve_batch_prefill_tokens", "Prefill tokens in the last engine step.",
                    s.last_num_prefill_tokens)
        yield gauge("deltaserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.",
                    s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        memory = GaugeMetricFamily("deltaserve_device_memory_bytes", "Device memory held, per component.",
                                   labels=["component"])
        for component, value in (("backbone", s.backbone_bytes), ("deltas", s.delta_slot_bytes),
                                 ("kv_cache", s.kv_cache_bytes)):
            memory.add_metric([component], value)
        yield memory
        steps = CounterMetricFamily("deltaserve_engine_steps", "Engine steps run since start.")
        steps.add_metric([], s.steps_total)
        yield steps
        # A capture stalls every running sequence once (its inter-token gap): these say how often and how long.
        captures = CounterMetricFamily("deltaserve_decode_graph_captures", "Decode CUDA graphs captured since "
                                       "start (the base model's at start-up; with tenant rows, a tenant mix's own "
                                       "at its exact_graph_after-th step and, when that is over 1, a batch size's "
                                       "covering graph at its first; again after a slot-layout change).")
        captures.add_metric([], s.graph_captures)
        yield captures
        capture_s = CounterMetricFamily("deltaserve_decode_graph_capture_seconds", "Engine time spent capturing "
                                        "decode CUDA graphs, warm-up steps included.")
        capture_s.add_metric([], s.graph_capture_seconds)
        yield capture_s
        covering = CounterMetricFamily("deltaserve_decode_graph_covering_steps", "Decode steps replayed by a "
                                       "batch size's covering graph (every kernel variant launched), their "
                                       "tenant mix having no graph of its own yet.")
        covering.add_metric([], s.graph_covering_steps)
        yield covering
        yield from _cache_gauges(self.cache_stats(), s.delta_slot_bytes)


def _cache_gauges(c, slot_bytes: int):
    resident = GaugeMetricFamily("deltaserve_delta_resident", "Deltas resident per tier.", labels=["tier"])
    resident.add_metric(["gpu"], len(c.slots))
    resident.add_metric(["host"], len(c.host_tenants))
    yield resident
    held = GaugeMetricFamily("deltaserve_delta_tier_bytes", "Bytes of deltas held per tier (gpu: the slots' "
                             "preallocated buffers).", labels=["tier"])
    held.add_metric(["gpu"], slot_bytes)
    held.add_metric(["host"], c.host_bytes)
    yield held
    # Tenants stand in for adapters: "running" hold a slot, "waiting" queue for a slot or for their load.
    info = GaugeMetricFamily("vllm:lora_requests_info", "Tenants (as LoRA adapters) with running and waiting "
                             "requests; the value is the time of the scrape.",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(c.max_slots), ",".join(c.running_tenants), ",".join(c.waiting_tenants)], time.time())
    yield info
