"""Token sampling: temperature, top-k, top-p, and classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond).

    Written as cond + (scale - 1) * (cond - uncond) so that scale 1.0 returns `cond` exactly.
    """
    return cond + (scale - 1.0) * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p; others -> -inf.

    Args:
        logits: (B, V) float.
        top_k: 0 disables.
        top_p: 0 (or >= 1) disables.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row. logits: (B, V). Returns (B,) long. temperature 0 means greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    # Shifted to a maximum of 0 before dividing: a tiny temperature then sends the others to -inf (greedy in the
    # limit) instead of overflowing to inf and NaN probabilities. softmax subtracts the maximum anyway.
    logits = logits - logits.amax(-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
