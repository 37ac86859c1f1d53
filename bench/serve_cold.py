"""Cold-tenant load latency: first requests to tenants whose delta is on disk, in host memory, or on the GPU.

Probes run one at a time on an otherwise idle server. Tenants from the unpopular tail are asked in turn,
more of them than there are slots, so the first ones are evicted from the GPU (LRU) while they stay in
the host tier; asking those again measures a host -> GPU load. Which tier served each probe is read from
the server's own tier counters (/metrics) around it, not assumed, and the server's load seconds come
from its load histogram (gpu: the whole load into a slot; host: disk read + validation).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from load_schedule import percentiles
from serve_client import RequestShape, single
from serve_process import LOAD_SECONDS, TIER_EVENTS, ServerProcess, metrics_diff
from serve_tenants import evict_from_page_cache, tenant_name



def probe_plan(num_tenants: int, max_slots: int, host_probes: int, avoid: set[int]) -> list[int]:
    """Tail tenants not in ``avoid`` (the load run's), max_slots + host_probes of them, least popular first."""
    tail = [r for r in range(num_tenants - 1, -1, -1) if r not in avoid]
    tail += [r for r in range(num_tenants - 1, -1, -1) if r in avoid]  # too few unused tenants: reuse some
    disk = tail[:max_slots + host_probes]
    return disk + disk[:host_probes] + disk[host_probes - 1:host_probes]


def served_from(diff: dict[str, float]) -> str:
    if diff.get(f"{TIER_EVENTS}{{event=hit,tier=gpu}}", 0) > 0:
        return "gpu"
    if diff.get(f"{TIER_EVENTS}{{event=hit,tier=host}}", 0) > 0:
        return "host"
    if diff.get(f"{TIER_EVENTS}{{event=miss,tier=host}}", 0) > 0:
        return "disk"
    return "unknown"


def cold_probes(server: ServerProcess, store: Path, plan: list[int], shape: RequestShape,
                timeout_s: float) -> dict:
    advised = evict_from_page_cache(store, [tenant_name(r) for r in set(plan)])
    rows = []
    for rank in plan:
        before = server.metrics()
        result = asyncio.run(single(server.url, rank, shape, timeout_s))
        after = server.metrics()
        diff = metrics_diff(before, after)
        rows.append({"tenant": tenant_name(rank), "served_from": served_from(diff), "ttft_s": result.ttft,
                     "error": result.error,
                     "server_slot_load_s": diff.get(f"{LOAD_SECONDS}_sum{{tier=gpu}}", 0.0),
                     "server_disk_read_s": diff.get(f"{LOAD_SECONDS}_sum{{tier=host}}", 0.0)})
    summary = {}
    for tier in ("disk", "host", "gpu"):
        mine = [r for r in rows if r["served_from"] == tier and r["error"] is None]
        summary[tier] = {"ttft_s": percentiles([r["ttft_s"] for r in mine]),
                         "server_slot_load_s": percentiles([r["server_slot_load_s"] for r in mine]),
                         "server_disk_read_s": percentiles([r["server_disk_read_s"] for r in mine])}
    return {"page_cache_dropped_files": advised, "by_tier": summary, "probes": rows}
