"""Cross Transformer: the baseline decoder. Causal self-attention -> cross-attention to the text -> MLP.

    x = x + Drop(SelfAttn(RMSNorm x)); x = x + Drop(CrossAttn(RMSNorm x, T5)); x = x + Drop(MLP(RMSNorm x))

The caption never enters the token stream, so padded captions are handled by the cross-attention key mask.
Decoding keeps a KV cache per layer for self-attention and the text's keys/values, computed once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modeling.layers import MLP, Block, Context, CrossAttention, DecodeState, SelfAttention, sinusoidal_embedding
from modeling.lm import TextToMusicLM


class CrossTransformer(TextToMusicLM):
    def __init__(
        self,
        *,
        vocab_size: int = 1025,
        d_model: int = 1024,
        n_layers: int = 24,
        n_heads: int = 16,
        text_dim: int = 768,
        mlp_dim: int = 2048,
        dropout: float = 0.3,
        cond_dropout: float = 0.1,
        norm_eps: float = 1e-5,
    ):
        super().__init__(
            vocab_size=vocab_size, d_model=d_model, text_dim=text_dim, cond_dropout=cond_dropout, norm_eps=norm_eps
        )
        for _ in range(n_layers):
            self.layers.append(
                Block(
                    d_model,
                    SelfAttention(d_model, n_heads, dropout=dropout),
                    MLP(d_model, mlp_dim),
                    cross_attn=CrossAttention(d_model, n_heads, dropout=dropout),
                    dropout=dropout,
                    norm_eps=norm_eps,
                )
            )
        self._init_weights(n_layers)

    def _hidden(self, tokens: Tensor, text: Tensor, text_mask: Tensor, state: DecodeState | None) -> Tensor:
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.token_emb(tokens) + sinusoidal_embedding(positions, self.d_model).to(self.token_emb.weight.dtype)
        ctx = Context(mask=None, memory=self.text_proj(text), memory_mask=text_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, None if state is None else state.layers[i])
        if state is not None:
            state.next_pos = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        return x

    def _step_hidden(self, tokens: Tensor, state: DecodeState) -> Tensor:
        x = self.token_emb(tokens) + sinusoidal_embedding(state.next_pos[:, None], self.d_model).to(
            self.token_emb.weight.dtype
        )
        for layer, cache in zip(self.layers, state.layers, strict=True):
            x = layer.step(x, cache)
        state.next_pos = state.next_pos + 1
        return x
