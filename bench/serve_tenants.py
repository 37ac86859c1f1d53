"""Benchmark tenants: a small pool of random packed deltas on disk, registered through the admin HTTP API.

Many tenants share a few distinct files (tenant i uploads pool file i % pool): the server's cost of a
tenant does not depend on its values, and the pool bounds the generator's disk use and time. The
server's store still holds one copy per tenant (the registry copies every upload), which is what
exercises its disk tier.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx

from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.format import write_delta
from random_models import G, random_delta


def tenant_name(rank: int) -> str:
    return f"t{rank:05d}"


def delta_pool(model: str, folder: Path, size: int, bits_per_param: float) -> list[Path]:
    """``size`` random deltas for ``model`` (Delta-CoMe tiers at ``bits_per_param``), made once per model."""
    checkpoint = open_checkpoint(model)
    fingerprint = checkpoint.fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(size):
        # The fingerprint in the name: a pool made for another base (or bit budget) is never reused.
        path = folder / f"pool-{fingerprint.split(':')[-1][:12]}-{bits_per_param:g}bpp-{i}.safetensors"
        if not path.exists():
            delta = random_delta(checkpoint.shapes(), fingerprint, seed=1000 + i, bits_per_param=bits_per_param)
            header = {"method": "deltacome", "base_fingerprint": fingerprint, "group_size": G,
                      "source": "bench/serve_load.py random packed delta", "bits_per_param_budget": bits_per_param}
            write_delta(path, delta.weights, header)
        paths.append(path)
    return paths


async def register(url: str, admin_key: str, store: Path, num_tenants: int, pool: list[Path],
                   concurrency: int = 8) -> int:
    """Create tenants t00000.. and upload their deltas; tenants that already have one (a reused store) are
    skipped. Returns how many were uploaded."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as admin:
        listed = (await admin.get("/admin/tenants")).raise_for_status().json()["data"]
        existing = {t["name"] for t in listed}
        ready = {t["name"] for t in listed if t["delta"] is not None}
        bodies = [p.read_bytes() for p in pool]  # a few files, sent many times: read once
        todo = [r for r in range(num_tenants) if tenant_name(r) not in ready]
        # One stored copy per tenant, plus the server's upload file and staged copy per upload in flight.
        need = sum(len(bodies[r % len(bodies)]) for r in todo) + 2 * concurrency * max(map(len, bodies))
        free = shutil.disk_usage(store).free
        if todo and need > 0.95 * free:  # fail now, not after an hour of uploads with the disk full
            raise RuntimeError(f"registering {len(todo)} tenants needs {need / 1e9:.1f} GB in {store}, "
                               f"{free / 1e9:.1f} GB free: lower --tenants or --bits-per-param")
        gate = asyncio.Semaphore(concurrency)

        async def one(rank: int) -> None:
            name = tenant_name(rank)
            async with gate:
                if name not in existing:
                    (await admin.post("/admin/tenants", json={"name": name})).raise_for_status()
                (await admin.put(f"/admin/tenants/{name}/delta", content=bodies[rank % len(bodies)])
                 ).raise_for_status()

        await asyncio.gather(*(one(r) for r in todo))
    return len(todo)


def evict_from_page_cache(store: Path, names: list[str]) -> int:
    """Drop the tenants' stored files from the OS page cache (no root needed for clean pages), so a first
    load reads the disk rather than memory just written. Returns how many files were advised."""
    count = 0
    for name in names:
        for path in (store / "deltas" / name).glob("*.safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count
