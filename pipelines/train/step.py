"""One optimizer step's gradient: the loss is the mean over every target token of the step.

Averaging per-micro-batch means (and then DDP's mean over workers) weights a token by 1 / (the token count of
its micro-batch): a batch of short clips counts as much as a batch of long ones. Here each micro-batch adds the
gradient of its *summed* token loss; when the step's micro-batches are in, the step's statistics are
all-reduced once (summed loss, token count, a non-finite flag) and the gradients are scaled by
world / (tokens of the step on all workers): DDP has already divided them by the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.train.distributed import all_reduce, no_sync_unless


@dataclass
class StepStats:
    """One worker's part of an optimizer step, or (after `reduced`) the whole step's."""

    loss_sum: float = 0.0  # summed token losses of the finite micro-batches
    tokens: int = 0  # target tokens (padding excluded)
    nonfinite: bool = False  # some micro-batch had a non-finite loss

    def reduced(self, device: torch.device) -> StepStats:
        """The step over all workers (one all-reduce; every worker must call it)."""
        loss_sum, tokens, nonfinite = all_reduce([self.loss_sum, float(self.tokens), float(self.nonfinite)], device)
        return StepStats(loss_sum=loss_sum, tokens=int(tokens), nonfinite=nonfinite > 0)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def micro_batch_backward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    stats: StepStats,
    *,
    pad_id: int,
    label_smoothing: float,
    amp: torch.dtype | None,
    sync: bool = True,
) -> None:
    """Forward + backward of one micro-batch's summed token loss; adds to `stats`.

    sync=False skips DDP's gradient all-reduce (every micro-batch of a step but the last).
    """
    device_type = batch["inputs"].device.type
    with no_sync_unless(model, sync):
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            out = model(
                batch["inputs"],
                batch["text"],
                batch["text_mask"],
                targets=batch["targets"],
                label_smoothing=label_smoothing,
            )
        tokens = int((batch["targets"] != pad_id).sum())
        loss_sum = out.loss * tokens  # the model's loss is the mean over the non-pad targets
        # Every worker runs backward on every micro-batch: DDP all-reduces gradients in the syncing one, and a
        # worker that skipped it would leave the others waiting forever. A non-finite loss makes this step's
        # gradients non-finite instead, and every worker skips the step (see `clip_and_step`).
        loss_sum.backward()
    if torch.isfinite(loss_sum):
        stats.loss_sum += loss_sum.item()
    else:
        stats.nonfinite = True
    stats.tokens += tokens


def scale_to_token_mean(params: Iterable[nn.Parameter], step: StepStats, world: int) -> None:
    """Turn accumulated gradients of summed losses (averaged over `world` workers by DDP) into the gradient
    of the step's per-token mean loss. `step` is the reduced (all-worker) statistics."""
    factor = world / max(step.tokens, 1)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def seed_micro_batch(seed: int, rank: int, step: int, micro: int) -> None:
    """Seed torch's generators (CPU and CUDA) from (seed, worker, optimizer step, micro-batch).

    Dropout and condition-dropout masks then depend on where the run is, not on how it got there: a rerun
    draws the same masks, a resumed run draws what the uninterrupted one would have, and sampling or
    validation between steps cannot shift them. Nothing needs saving in a checkpoint for it.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1))
