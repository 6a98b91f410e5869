"""Prefix SiMBA: Mamba-2 sequence mixing + MLP channel mixing over [text prefix; BOS; audio tokens].

    x = x + Drop(Mamba2(RMSNorm x));  x = x + Drop(MLP(RMSNorm x))          (x 24, d_model 1024)

The Flan-T5 caption is projected to the model width and prepended. Captions of different lengths are
*left*-padded, and the Mamba-2 mixer zeroes padding positions (before the conv, and x / dt after it), so
the scan state at the first real frame is exactly the zero state a lone sample would have: a sample's
logits do not depend on what else is in its batch. Positions count from each sample's first real frame.

`attn_layers` turns chosen layers into causal self-attention layers (a hybrid) through the same block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modeling.layers import MLP, Block, Context, DecodeState, SelfAttention, sinusoidal_embedding
from modeling.lm import TextToMusicLM, shift_left
from modeling.mamba2 import Mamba2


@dataclass
class SSMCache:
    conv_state: Tensor  # (B, conv_dim, d_conv)
    ssm_state: Tensor  # (B, nheads, headdim, d_state), fp32


class MambaMixer(Mamba2):
    """Mamba2 speaking the block's mixer protocol. Subclassing keeps mamba_ssm's parameter names."""

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> SSMCache:
        conv_state, ssm_state = self.allocate_inference_cache(batch_size, max_len, dtype=dtype, device=device)
        return SSMCache(conv_state, ssm_state)

    def mix(self, x: Tensor, mask: Tensor | None = None, cache: SSMCache | None = None) -> Tensor:
        if cache is None:
            return self(x, mask=mask)
        y, (conv_state, ssm_state) = self(x, mask=mask, return_final_state=True)
        cache.conv_state.copy_(conv_state)
        cache.ssm_state.copy_(ssm_state)
        return y

    def mix_step(self, x: Tensor, cache: SSMCache) -> Tensor:
        y, cache.conv_state, cache.ssm_state = self.step(x, cache.conv_state, cache.ssm_state)
        return y


class PrefixSiMBA(TextToMusicLM):
    def __init__(
        self,
        *,
        vocab_size: int = 1025,
        d_model: int = 1024,
        n_layers: int = 24,
        text_dim: int = 768,
        mlp_dim: int = 2048,
        dropout: float = 0.3,
        d_state: int = 512,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        attn_layers: tuple[int, ...] = (),
        n_heads: int = 16,
        cond_dropout: float = 0.1,
        norm_eps: float = 1e-5,
    ):
        super().__init__(
            vocab_size=vocab_size, d_model=d_model, text_dim=text_dim, cond_dropout=cond_dropout, norm_eps=norm_eps
        )
        for i in range(n_layers):
            if i in attn_layers:
                mixer = SelfAttention(d_model, n_heads, dropout=dropout)
            else:
                mixer = MambaMixer(
                    d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                    ngroups=ngroups, chunk_size=chunk_size, layer_idx=i,
                )  # fmt: skip
            self.layers.append(Block(d_model, mixer, MLP(d_model, mlp_dim), dropout=dropout, norm_eps=norm_eps))
        self._init_weights(n_layers)

    def _hidden(self, tokens: Tensor, text: Tensor, text_mask: Tensor, state: DecodeState | None) -> Tensor:
        prefix, prefix_mask = shift_left(text, text_mask)  # (B, S, C), (B, S): padding first
        S = prefix.shape[1]
        x = torch.cat([self.text_proj(prefix), self.token_emb(tokens)], dim=1)  # (B, S+T, D)
        token_mask = torch.ones_like(tokens, dtype=torch.bool)
        mask = torch.cat([prefix_mask, token_mask], dim=1)  # (B, S+T)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # 0 at each sample's first real frame
        x = x + sinusoidal_embedding(positions, self.d_model).to(x.dtype)
        # Left padding only touches the start, so a layer needs no mask when nothing is padded.
        ctx = Context(mask=None if bool(prefix_mask.all()) else mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, None if state is None else state.layers[i])
        if state is not None:
            state.next_pos = positions[:, -1] + 1
        return x[:, S:]

    def _step_hidden(self, tokens: Tensor, state: DecodeState) -> Tensor:
        x = self.token_emb(tokens)  # (B, 1, D)
        x = x + sinusoidal_embedding(state.next_pos[:, None], self.d_model).to(x.dtype)
        for layer, cache in zip(self.layers, state.layers, strict=True):
            x = layer.step(x, cache)
        # In place, like every state update of an attention-free step: the state keeps its memory from step to
        # step, which a replayed CUDA graph needs (it reads and writes fixed addresses).
        state.next_pos += 1
        return x
