"""Pieces shared by both decoders: norms, MLP, attention with KV cache, sinusoidal positions, and the block.

A block is `Block(dim, mixer, mlp, cross_attn=None)` (mamba_ssm `create_block` style): SiMBA and the Cross
Transformer differ only in the mixer they inject (Mamba-2 or self-attention) and in the optional
cross-attention sublayer. Every mixer speaks the same small protocol:

    mixer.mix(x, mask, cache)    full sequence; when `cache` is given it is filled for decoding (prefill)
    mixer.mix_step(x, cache)     one new token, O(1) for Mamba-2 and O(t) for attention
    mixer.allocate_cache(batch_size, max_len, device, dtype)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from modeling import pages


def sinusoid_frequencies(dim: int, max_period: float = 10_000.0, device=None) -> Tensor:
    """The (dim // 2,) float32 frequencies of `sinusoidal_embedding`."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal position embedding (cos | sin halves, as audiocraft).

    Args:
        positions: (B, T) integer or float positions.
        dim: embedding size (even).
    Returns:
        (B, T, dim) float32.
    """
    freqs = sinusoid_frequencies(dim, max_period, positions.device)
    angles = positions.to(torch.float32)[..., None] * freqs  # (B, T, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: bf16 sums of squares over 1024 channels lose too many bits.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """Channel mixing: Linear -> GELU -> Linear (SiMBA's replacement for EinFFT, and the Transformer's FF)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class KVCache:
    """Self-attention cache: keys/values preallocated to `max_len`, filled up to `length`."""

    k: Tensor  # (B, H, max_len, Dh)
    v: Tensor  # (B, H, max_len, Dh)
    key_mask: Tensor  # (B, max_len) bool, True = a real token may be attended to
    length: int = 0


@dataclass
class MemoryCache:
    """Cross-attention cache: keys/values of the text memory, computed once at prefill."""

    k: Tensor | None = None  # (B, H, S, Dh)
    v: Tensor | None = None
    mask: Tensor | None = None  # (B, S) bool


def _self_attention_mask(mask: Tensor, T: int, device: torch.device) -> Tensor:
    """Causal mask, combined with key padding (mask: (B, T) bool). Returns bool (B, 1, T, T), True = attend."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & mask[:, None, :]  # (B, T, T)
    # A padding query would see no key at all (softmax of all -inf = NaN); let it see itself. Real queries
    # never see padding keys, so this cannot leak into real positions.
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with key padding and a preallocated KV cache."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool = False) -> Tensor:
        # Attention dropout is a training-time regulariser only (the paper's code left it on at inference).
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        dim = self.qkv.in_features
        shape = (batch_size, self.n_heads, max_len, dim // self.n_heads)
        dtype = dtype or self.qkv.weight.dtype
        return KVCache(  # streamed every step: on huge pages on the CPU
            k=pages.zeros(shape, device=device, dtype=dtype),
            v=pages.zeros(shape, device=device, dtype=dtype),
            key_mask=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
        )

    def mix(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x: (B, T, D); mask: (B, T) bool, True = real token (None: all real)."""
        B, T, _ = x.shape
        q, k, v = self._heads(x)  # (B, H, T, Dh) each
        if cache is not None:
            cache.k[:, :, :T] = k
            cache.v[:, :, :T] = v
            cache.key_mask[:, :T] = True if mask is None else mask
            cache.length = T
        if mask is None:
            # No padding (the Cross Transformer's token stream): `is_causal` without a T x T mask lets SDPA pick a
            # fused kernel on a GPU (cuDNN attention on an H200 with torch 2.11, FlashAttention where cuDNN's is not
            # available); a T x T mask rules FlashAttention out and costs T^2 memory.
            return self._attend(q, k, v, None, is_causal=True)
        return self._attend(q, k, v, _self_attention_mask(mask, T, x.device))  # a hybrid's left-padded prefix

    def mix_step(self, x: Tensor, cache: KVCache) -> Tensor:
        """x: (B, 1, D), the next token; attends to everything in the cache and itself."""
        q, k, v = self._heads(x)  # (B, H, 1, Dh)
        t = cache.length
        if t >= cache.k.shape[2]:
            raise RuntimeError(f"KV cache is full ({t} positions); allocate a longer cache")
        cache.k[:, :, t : t + 1] = k
        cache.v[:, :, t : t + 1] = v
        cache.key_mask[:, t] = True
        cache.length = t + 1
        attn_mask = cache.key_mask[:, None, None, : t + 1]  # (B, 1, 1, t+1)
        return self._attend(q, cache.k[:, :, : t + 1], cache.v[:, :, : t + 1], attn_mask)


class CrossAttention(nn.Module):
    """Attention from the audio stream to the (projected) text memory; the memory's K/V are cached once."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor, cache: MemoryCache | None = None) -> Tensor:
        """x: (B, T, D); memory: (B, S, D); memory_mask: (B, S) bool. Fills `cache` when given."""
        k, v = rearrange(self.kv_proj(memory), "b s (two h d) -> two b h s d", two=2, h=self.n_heads)
        if cache is not None:
            cache.k, cache.v, cache.mask = k, v, memory_mask
        return self._attend(x, k, v, memory_mask)

    def step(self, x: Tensor, cache: MemoryCache) -> Tensor:
        return self._attend(x, cache.k, cache.v, cache.mask)

    def _attend(self, x: Tensor, k: Tensor, v: Tensor, memory_mask: Tensor) -> Tensor:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :], dropout_p=p)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))


@dataclass
class LayerCache:
    mixer: object  # the mixer's own cache (KVCache, or the SSM's conv/ssm states)
    cross: MemoryCache | None = None


@dataclass
class DecodeState:
    """Everything a decoder carries between generation steps."""

    layers: list[LayerCache]
    next_pos: Tensor  # (B,) position of the next token in the model's positional encoding


def state_tensors(obj) -> list[Tensor]:
    """Every tensor of a (nested) dataclass, list or tuple: a DecodeState's caches, for what walks its memory."""
    if isinstance(obj, Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in state_tensors(getattr(obj, f.name))]
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in state_tensors(x)]
    return []


@dataclass
class Context:
    """What every layer of one forward pass needs besides the hidden states."""

    mask: Tensor | None = None  # (B, T) bool, True = real token of the sequence
    memory: Tensor | None = None  # (B, S, D) projected text, for cross-attention
    memory_mask: Tensor | None = None  # (B, S) bool


class Block(nn.Module):
    """Pre-norm residual block: x + Drop(mixer(norm x)) [+ Drop(cross(norm x, text))] + Drop(MLP(norm x))."""

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        mlp: nn.Module,
        cross_attn: CrossAttention | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps)
        self.mixer = mixer
        self.norm_cross = RMSNorm(dim, norm_eps) if cross_attn is not None else None
        self.cross_attn = cross_attn
        self.norm2 = RMSNorm(dim, norm_eps)
        self.mlp = mlp
        self.drop = nn.Dropout(dropout)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> LayerCache:
        mixer_cache = self.mixer.allocate_cache(batch_size, max_len, device=device, dtype=dtype)
        return LayerCache(mixer=mixer_cache, cross=MemoryCache() if self.cross_attn is not None else None)

    def forward(self, x: Tensor, ctx: Context, cache: LayerCache | None = None) -> Tensor:
        x = x + self.drop(self.mixer.mix(self.norm1(x), ctx.mask, None if cache is None else cache.mixer))
        if self.cross_attn is not None:
            memory_cache = None if cache is None else cache.cross
            x = x + self.drop(self.cross_attn(self.norm_cross(x), ctx.memory, ctx.memory_mask, memory_cache))
        return x + self.drop(self.mlp(self.norm2(x)))

    def step(self, x: Tensor, cache: LayerCache) -> Tensor:
        """x: (B, 1, D). Dropout is skipped: decoding runs in eval mode."""
        x = x + self.mixer.mix_step(self.norm1(x), cache.mixer)
        if self.cross_attn is not None:
            x = x + self.cross_attn.step(self.norm_cross(x), cache.cross)
        return x + self.mlp(self.norm2(x))
