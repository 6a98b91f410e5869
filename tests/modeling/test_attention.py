"""Self-attention: the fused causal path (no mask) against the explicit-mask path, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modeling.layers
from modeling.layers import SelfAttention


def _pair(seed: int = 0) -> tuple[SelfAttention, torch.Tensor]:
    torch.manual_seed(seed)
    return SelfAttention(32, 4).eval(), torch.randn(3, 17, 32, dtype=torch.float64)


def _sdpa_calls(monkeypatch) -> list[dict]:
    """Record how scaled_dot_product_attention is called (the real function still runs)."""
    calls, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append({"is_causal": kwargs.get("is_causal", False), "attn_mask": kwargs.get("attn_mask")})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(modeling.layers.F, "scaled_dot_product_attention", recording)
    return calls


def test_unpadded_sequences_take_the_fused_causal_path(monkeypatch):
    attn, x = _pair()
    attn = attn.double()
    calls = _sdpa_calls(monkeypatch)
    attn.mix(x)
    assert calls == [{"is_causal": True, "attn_mask": None}]  # no T x T mask: FlashAttention can run on a GPU
    attn.mix(x, torch.ones(3, 17, dtype=torch.bool))
    assert calls[1]["is_causal"] is False and calls[1]["attn_mask"].shape == (3, 1, 17, 17)


@pytest.mark.parametrize("with_cache", [False, True])
def test_fused_and_masked_paths_agree(with_cache):
    attn, x = _pair(1)
    attn = attn.double()
    x_fused, x_masked = x.clone().requires_grad_(), x.clone().requires_grad_()
    caches = [attn.allocate_cache(3, 20, dtype=torch.float64) if with_cache else None for _ in range(2)]
    y_fused = attn.mix(x_fused, None, caches[0])
    y_masked = attn.mix(x_masked, torch.ones(3, 17, dtype=torch.bool), caches[1])
    diff = (y_fused - y_masked).abs().max().item()
    print(f"max |fused - masked| = {diff:.3e}")
    torch.testing.assert_close(y_fused, y_masked, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(y_fused)
    grads_fused = torch.autograd.grad((y_fused * weight).sum(), [x_fused, *attn.parameters()])
    grads_masked = torch.autograd.grad((y_masked * weight).sum(), [x_masked, *attn.parameters()])
    for g_fused, g_masked in zip(grads_fused, grads_masked, strict=True):
        torch.testing.assert_close(g_fused, g_masked, rtol=1e-10, atol=1e-12)
    if with_cache:  # the prefill fills the cache the same way, so decoding continues identically
        step = torch.randn(3, 1, 32, dtype=torch.float64)
        torch.testing.assert_close(attn.mix_step(step, caches[0]), attn.mix_step(step, caches[1]))


def test_fused_path_is_causal():
    attn, x = _pair(2)
    x = x.requires_grad_()
    y = attn.mix(x.float())
    (grad,) = torch.autograd.grad(y[:, 5].sum(), x)
    assert grad[:, 6:].abs().max() == 0 and grad[:, :6].abs().max() > 0
