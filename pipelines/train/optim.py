"""Optimisation in the loop: AdamW over the model's parameter groups, warm-up + cosine, the guarded step, autocast."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch

from configs.schema import TrainConfig
from modeling.lm import TextToMusicLM


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: TextToMusicLM, t: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decay on matrices only (no decay for norms, biases, embeddings, A_log / D / dt_bias)."""
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
    schedule = partial(lr_factor, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def clip_and_step(
    params: Iterable[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    *,
    skip: bool = False,
) -> float | None:
    """Clip the gradients to `grad_clip` (0: no clipping) and take one optimizer + schedule step.

    The step is skipped when `skip` (a non-finite loss on some worker) or when the gradient norm is not
    finite: a finite loss can still overflow in backward, and stepping would write inf/NaN into the weights
    and AdamW's moments. The gradient norm is computed after DDP's all-reduce, so every worker decides alike.
    Returns the pre-clip gradient norm, or None when skipped; the gradients are cleared either way.
    """
    norm = None
    if not skip:
        total = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if torch.isfinite(total):
            opt.step()
            sched.step()
            norm = float(total)
    opt.zero_grad(set_to_none=True)
    return norm


def autocast_dtype(t: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a CUDA device that supports it (precision auto or bf16); fp32 otherwise."""
    if t.precision == "fp32" or device.type != "cuda":
        return None
    if t.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
