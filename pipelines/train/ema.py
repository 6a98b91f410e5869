"""Exponential moving average of the weights (`train.ema_decay`; MusicGen trains with 0.99, the paper without).

After every optimizer step, ema <- decay * ema + (1 - decay) * weights, in fp32 on the model's device. The
average is what a run hands out when it is on: the samples during training, `best/`, and the `model.pt` of
each checkpoint (so generation and evaluation need no flag); the raw training weights travel in `state.pt`
for the resume. Every worker keeps the same average, since DDP keeps the weights identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [current[k].float() for k in keys], 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged values in place of the weights (in the weights' dtypes)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights back after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.state_dict(model))
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)
