"""Validation loss: mean cross-entropy over the validation split, summed over every worker's shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.train.dataset import EpochBatches, collate
from pipelines.train.distributed import all_reduce


@torch.no_grad()
def validate(model, source: EpochBatches, device: torch.device, amp: torch.dtype | None) -> float:
    """Mean cross-entropy (no label smoothing) over the non-pad tokens of the validation split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for numpy_batch in source.epoch(0):
        batch = collate(numpy_batch, device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(batch["inputs"], batch["text"], batch["text_mask"]).logits
        targets = batch["targets"]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
        )
        keep = targets.reshape(-1) != logits.shape[-1] - 1
        total += float(loss[keep].sum())
        count += float(keep.sum())
    model.train(was_training)
    total, count = all_reduce([total, count], device)
    return total / max(count, 1.0)
