"""What the loop needs from torch.distributed, as no-ops when it runs alone (one worker, or local mode)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over the workers (unchanged without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def no_sync_unless(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` (this backward skips the gradient all-reduce) unless `sync`; a no-op context otherwise."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
