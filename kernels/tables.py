"""Small int64 descriptor tables (buffer addresses and sizes) uploaded once and reused across steps."""
from __future__ import annotations

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
