"""What the loop needs from torch.distributed, as no-ops when it runs alone (one worker, or local mode)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or "max") `values` over the workers (unchanged without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(t, op=reduce_op)
    return t.tolist()


def replica_spread(model: nn.Module, device: torch.device) -> float:
    """max - min over the workers of a checksum of the parameters: 0.0 while DDP keeps the replicas identical."""
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    high, neg_low = all_reduce([checksum, -checksum], device, op="max")
    return high + neg_low


def no_sync_unless(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` (this backward skips the gradient all-reduce) unless `sync`; a no-op context otherwise."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()


def shard_overlap(rows: list[int]) -> int:
    """Rows consumed by more than one worker, from every worker's `rows` (0 while the shards are disjoint)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    everyone: list[list[int] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, rows)
    counts: dict[int, int] = {}
    for worker_rows in everyone:
        for row in set(worker_rows):
            counts[row] = counts.get(row, 0) + 1
    return sum(1 for c in counts.values() if c > 1)
