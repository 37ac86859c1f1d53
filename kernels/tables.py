"""Small int tables on the device: descriptor tables (buffer addresses and sizes) uploaded once and reused
across steps, and per-step metadata uploaded from host lists without waiting for the device."""
from __future__ import annotations

import numpy as np
import torch

_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 512


def device_table(rows: list[tuple[int, ...]], width: int, device: torch.device) -> torch.Tensor:
    """int64 [len(rows), width] on device, cached on its contents: the engine's persistent slot buffers cost
    one upload per layer for the life of the process, and a reallocated buffer simply gets a new entry."""
    key = (str(device), width, tuple(rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, width)
        _TABLES[key] = table
    return table


def upload_packed(parts: list[list[float]], device: torch.device,
                  dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Several host lists of numbers on `device` as `dtype` in one copy: the one tensor, and a view of it per part.

    On CUDA the staging tensor is pinned and the copy non_blocking, so the host queues it behind the running
    work and goes on; a plain `torch.tensor(list, device="cuda")` waits for the device to drain first.
    Every view starts 16-byte aligned: Triton specializes a kernel on whether each pointer argument is, so
    views at offsets that follow the batch's list lengths compiled new kernel variants inside requests
    (bench/results/first_use.md).
    """
    align = max(1, 16 // dtype.itemsize)
    sizes = [-(-len(p) // align) * align for p in parts]
    flat = [v for part, size in zip(parts, sizes) for v in [*part, *[0] * (size - len(part))]]
    cuda = device.type == "cuda"
    host = torch.tensor(flat, dtype=dtype, pin_memory=cuda)
    packed = host.to(device, non_blocking=True) if cuda else host
    return packed, [view[:len(part)] for view, part in zip(packed.split(sizes), parts)]


def upload_array(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` in one copy: on CUDA staged in page-locked memory and non_blocking, as
    upload_packed (the result starts 16-byte aligned: a fresh tensor)."""
    host = torch.from_numpy(array)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def upload_lists(parts: list[list[float]], device: torch.device,
                 dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """upload_packed's views."""
    return upload_packed(parts, device, dtype)[1]


def live_tables() -> list[torch.Tensor]:
    """Every cached descriptor table: a captured CUDA graph holds these so that none it reads is ever freed
    (the cache may drop them, the graph's addresses must stay valid)."""
    return list(_TABLES.values())
