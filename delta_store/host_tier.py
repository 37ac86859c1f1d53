"""Host-memory tier: decoded delta files kept in (pinned, when CUDA is present) RAM, LRU under a byte limit.

It sits between the disk and the engine's slots: reloading a recently evicted tenant into a slot then
skips file reading and parsing, and pinned pages let the engine copy to the GPU asynchronously.
Thread-safe: slot loads run in worker threads.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from deltaserve.delta_store.format import DeltaFile, DeltaFormatError, load_delta_buffer
from deltaserve.delta_store.registry import DeltaVersion


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to every tensor inside nested dataclasses / dicts / lists (DeltaFile's weight records)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        )
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def read_pinned_delta(path: Path, expected_fingerprint: str | None = None,
                      base_shapes: Mapping[str, tuple] | None = None) -> DeltaFile:
    """load_delta with every tensor a view into one page-locked copy of the file (plain memory without CUDA).

    One allocation and one read instead of one of each per tensor: a delta has thousands of tensors, and every
    torch call of a load thread is a GIL round trip against the engine's busy threads."""
    size = path.stat().st_size
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    data = buffer.numpy()                       # the buffer protocol view that load_delta_buffer reads
    with open(path, "rb") as f:
        if f.readinto(data) != size:
            raise DeltaFormatError(f"{path}: shorter than its size ({size} bytes) when read")
    return load_delta_buffer(path, data, expected_fingerprint=expected_fingerprint, base_shapes=base_shapes)


class HostTier:
    """LRU of DeltaFiles keyed by tenant; an entry counts as its file's size on disk."""

    def __init__(self, limit_bytes: int, on_evict: Callable[[str], None]):
        if limit_bytes < 0:
            raise ValueError("host tier limit must be >= 0 bytes")
        self.limit_bytes = limit_bytes
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[DeltaVersion, DeltaFile]] = OrderedDict()
        self._bytes = 0

    def get(self, version: DeltaVersion) -> DeltaFile | None:
        """The cached copy of exactly this version (None for a miss or an older version)."""
        with self._lock:
            hit = self._entries.get(version.tenant)
            if hit is None or hit[0] != version:
                return None
            self._entries.move_to_end(version.tenant)
            return hit[1]

    def put(self, version: DeltaVersion, delta: DeltaFile) -> None:
        """Cache a delta, evicting least recently used ones to stay under the limit (too big: not cached)."""
        if version.size_bytes > self.limit_bytes:
            return
        evicted = []
        with self._lock:
            self._remove(version.tenant)
            while self._bytes + version.size_bytes > self.limit_bytes:
                tenant = next(iter(self._entries))
                self._remove(tenant)
                evicted.append(tenant)
            self._entries[version.tenant] = (version, delta)
            self._bytes += version.size_bytes
        for tenant in evicted:
            self._on_evict(tenant)

    def drop(self, tenant: str) -> None:
        with self._lock:
            self._remove(tenant)

    def snapshot(self) -> tuple[int, list[str]]:
        """(bytes held, tenants from least to most recently used)."""
        with self._lock:
            return self._bytes, list(self._entries)

    def _remove(self, tenant: str) -> None:
        entry = self._entries.pop(tenant, None)
        if entry is not None:
            self._bytes -= entry[0].size_bytes
