"""Mamba-2 mixer (Dao & Gu, 2024) with mamba_ssm's constructor and parameter names.

Checkpoints load both ways between this module and `mamba_ssm.modules.mamba2.Mamba2`:
`in_proj` (outputs z, x, B, C, dt), `conv1d` (depthwise over x, B, C), `dt_bias`, `A_log`, `D`,
`norm.weight` (gated RMSNorm) and `out_proj`.

Two paths, one class:
- fast (CUDA with mamba_ssm installed): Triton SSD scan, causal_conv1d kernels, fused gated RMSNorm;
- pure PyTorch (everything else, and the reference the fast path is tested against): the chunked SSD
  algorithm of the Mamba-2 paper, computed in fp32 (fp64 for fp64 inputs) and cast back at the end.

Per head h, with dt = softplus(dt_raw + dt_bias) and A = -exp(A_log):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * (x_t outer B_t)        # (P, N)
    y_t     = state_t @ C_t + D * x_t
then y = out_proj(RMSNorm(y * silu(z))).

Padding: positions with mask False leave both states untouched (their conv inputs are zeroed and their
dt and x are set to 0, so exp(dt * A) = 1), which makes a left-padded sample behave exactly like the
unpadded sample at its real positions.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from modeling import pages

logger = logging.getLogger(__name__)

# mamba_ssm needs CUDA and Triton; on a CPU box its import fails in several ways (ImportError, OSError from
# missing CUDA libraries, RuntimeError from Triton), and none of them may break this module's import.
try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:
    rmsnorm_fn, selective_state_update, mamba_chunk_scan_combined = None, None, None

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except Exception:
    causal_conv1d_fn, causal_conv1d_update = None, None

CAUSAL_CONV1D_WIDTHS = (2, 3, 4)  # the conv widths causal_conv1d's kernels take; others use the PyTorch conv
_warned_no_fast_path = False


def _warn_no_fast_path_once() -> None:
    global _warned_no_fast_path
    if not _warned_no_fast_path:
        _warned_no_fast_path = True
        logger.warning(
            "Mamba2 runs on CUDA without mamba_ssm: using the pure-PyTorch path, ~2x slower and memory hungry (a "
            "paper-size training step at batch 4 x 2588 peaks at 76 GiB instead of 21 GiB: it no longer fits a 24 GiB "
            "GPU). Install with `uv pip install --no-build-isolation mamba-ssm causal-conv1d`."
        )


def _segsum(x: Tensor) -> Tensor:
    """Segment sums: out[..., i, j] = x[..., j+1] + ... + x[..., i] for i >= j, -inf above the diagonal.

    Built as a masked cumulative sum rather than cumsum[i] - cumsum[j]: the difference of two large
    cumulative sums loses the small segment sums to cancellation.

    Args:
        x: (..., T)
    Returns:
        (..., T, T)
    """
    T = x.shape[-1]
    x = repeat(x, "... t -> ... t s", s=T)  # (..., T, T), x[..., i, j] = x[..., i]
    below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~below, 0.0)
    out = torch.cumsum(x, dim=-2)  # (..., T, T)
    on_or_below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~on_or_below, float("-inf"))


# The pure path's SSD chunk. Its within-chunk work is a (chunk x chunk) decay matrix per chunk and head: the
# segsum (a masked cumsum and, in backward, flip + cumsum + flip), exp and products over it are memory-bound,
# so their cost grows with the chunk while the matmuls' share falls. One Mamba2 layer (d_model 512, d_state
# 128, headdim 64), forward + backward over 2620 positions on a 2-core AMD EPYC: chunk 32 461 ms, 64 345 ms,
# 128 360 ms, 256 572 ms; a whole 6-layer SiMBA training step at 2588 tokens 3.96 -> 2.72 s (bench/train_step.py).
# The chunk changes the work, not the result (tests/modeling/test_mamba2.py), so no CPU is tuned for here:
# a smaller chunk does fewer operations on every machine. The CUDA kernel keeps the configured chunk_size.
PURE_PATH_MAX_CHUNK = 64


def _ssd_chunked(
    x: Tensor, dA: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked state-space-duality scan (the "ssd_minimal" listing of the Mamba-2 paper), grouped B / C.

    Computes state_t = exp(dA_t) * state_{t-1} + x_t outer B_t, y_t = state_t @ C_t for every head.
    Head h reads group h // (nheads // ngroups), as in mamba_ssm's kernels.

    Args:
        x: (b, L, h, p) inputs already scaled by dt.
        dA: (b, L, h) log decays dt * A (<= 0).
        B, C: (b, L, g, n).
        chunk_size: chunk length; any L is allowed (padded internally).
        initial_state: (b, h, p, n) or None for zeros.
    Returns:
        y: (b, L, h, p) and the final state (b, h, p, n).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    pad = -seqlen % chunk_size
    if pad:
        # dA = 0 (decay 1) and x = 0 leave the state untouched, so the padded tail changes nothing.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    x = rearrange(x, "b (c l) (g r) p -> b c l g r p", l=chunk_size, g=ngroups)  # (b, c, l, g, r, p)
    B = rearrange(B, "b (c l) g n -> b c l g n", l=chunk_size)  # (b, c, l, g, n)
    C = rearrange(C, "b (c l) g n -> b c l g n", l=chunk_size)  # (b, c, l, g, n)
    dA = rearrange(dA, "b (c l) h -> b h c l", l=chunk_size)  # (b, h, c, l)
    dA_cumsum = torch.cumsum(dA, dim=-1)  # (b, h, c, l)

    # 1. Within each chunk, the quadratic ("attention") form: y_l = sum_{s<=l} (C_l . B_s) decay(s->l) x_s.
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, l, s)
    decay = rearrange(torch.exp(_segsum(dA)), "b (g r) c l s -> b c g r l s", g=ngroups)  # (b, c, g, r, l, s)
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", CB[:, :, :, None] * decay, x)  # (b, c, l, g, r, p)

    # 2. The state each chunk builds from its own inputs, decayed to the chunk's end.
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # (b, h, c, l)
    decay_to_end = rearrange(decay_to_end, "b (g r) c l -> b c l g r 1", g=ngroups)  # (b, c, l, g, r, 1)
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, x * decay_to_end)  # (b, c, g, r, p, n)
    chunk_states = rearrange(chunk_states, "b c g r p n -> b c (g r) p n")  # (b, c, h, p, n)

    # 3. Pass states across chunks: the (c+1) x (c+1) recurrence over chunk totals, in the same segsum form.
    if initial_state is None:
        initial_state = x.new_zeros(batch, nheads, headdim, d_state)
    chunk_states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)  # (b, c+1, h, p, n)
    states, final_state = states[:, :-1], states[:, -1]  # entering each chunk; after the last

    # 4. Contribution of the state entering each chunk, decayed to each position.
    states = rearrange(states, "b c (g r) p n -> b c g r p n", g=ngroups)  # (b, c, g, r, p, n)
    decay_from_start = rearrange(torch.exp(dA_cumsum), "b (g r) c l -> b c l g r 1", g=ngroups)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states) * decay_from_start  # (b, c, l, g, r, p)

    y = rearrange(y_diag + y_off, "b c l g r p -> b (c l) (g r) p")  # (b, L + pad, h, p)
    return y[:, :seqlen], final_state


class RMSNormGated(nn.Module):
    """Gated RMSNorm with mamba_ssm's semantics (`ops/triton/layernorm_gated.RMSNorm`).

    norm_before_gate=False: RMSNorm(x * silu(z)) * weight; True: RMSNorm(x) * weight * silu(z).
    The RMS is taken over groups of `group_size` channels (one group per B/C group in Mamba-2).
    Computed in fp32 at least; returns x's dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """x, z: (..., hidden_size). Returns (..., hidden_size) in x's dtype."""
        dtype = x.dtype
        cdtype = torch.promote_types(dtype, torch.float32)
        x = x.to(cdtype)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(cdtype))
        group_size = self.group_size or x.shape[-1]
        xg = rearrange(x, "... (g d) -> ... g d", d=group_size)  # (..., G, group_size)
        xg = xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)
        out = rearrange(xg, "... g d -> ... (g d)") * self.weight.to(cdtype)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(cdtype))
        return out.to(dtype)


class Mamba2(nn.Module):
    """Mamba-2 sequence mixer, (B, L, d_model) -> (B, L, d_model).

    Args (mamba_ssm's names and defaults):
        d_model: model width.
        d_state: SSM state size N per group.
        d_conv: depthwise causal conv width over (x, B, C).
        expand: d_inner = expand * d_model.
        headdim: P; nheads = d_inner // headdim.
        ngroups: number of B / C groups shared by nheads // ngroups heads each.
        A_init_range: A = -uniform(A_init_range) at init, stored as A_log.
        dt_min, dt_max, dt_init_floor: softplus(dt_bias) is log-uniform in [dt_min, dt_max] at init.
        dt_limit: clamp of dt after softplus; (0, inf) means none.
        rmsnorm: gated RMSNorm before out_proj (else y * silu(z)).
        norm_before_gate: see RMSNormGated.
        bias, conv_bias: biases of in_proj / out_proj and of the conv.
        chunk_size: SSD chunk length (an efficiency knob; outputs do not depend on it). The fast path uses it
            as is; the pure path caps it at PURE_PATH_MAX_CHUNK.
        layer_idx: position in the stack (kept for mamba_ssm compatibility).
        use_fast_path: use mamba_ssm / causal_conv1d kernels on CUDA when importable.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
        use_fast_path: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {self.d_inner} is not a multiple of headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads {self.nheads} is not a multiple of ngroups {ngroups}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.dt_limit = tuple(dt_limit)
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.use_fast_path = use_fast_path

        # Order: [z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory_kwargs,
        )

        # softplus(dt_bias) log-uniform in [dt_min, dt_max]; inverse softplus: y + log(1 - exp(-y)).
        dt = torch.exp(
            torch.rand(self.nheads, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True

        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True

        self.D = nn.Parameter(torch.ones(self.nheads, **factory_kwargs))
        self.D._no_weight_decay = True

        if rmsnorm:
            self.norm = RMSNormGated(
                self.d_inner,
                eps=1e-5,
                group_size=self.d_inner // ngroups,
                norm_before_gate=norm_before_gate,
                **factory_kwargs,
            )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    # ----------------------------------------------------------------------------------------------- helpers

    def _fast(self, u: Tensor) -> bool:
        if not (u.is_cuda and self.use_fast_path):
            return False
        if mamba_chunk_scan_combined is None:
            _warn_no_fast_path_once()
            return False
        return True

    def _dt(self, dt: Tensor, mask: Tensor | None = None) -> Tensor:
        """Raw dt (..., nheads) -> softplus(dt + dt_bias), clamped to dt_limit, 0 where mask is False (fp32+)."""
        cdtype = torch.promote_types(dt.dtype, torch.float32)
        dt = F.softplus(dt.to(cdtype) + self.dt_bias.to(cdtype))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        if mask is not None:
            dt = dt * mask[..., None].to(cdtype)
        return dt

    def _gate_norm(self, y: Tensor, z: Tensor, fast: bool) -> Tensor:
        """y, z: (..., d_inner) -> norm(y * silu(z)) (or the variants set by rmsnorm / norm_before_gate)."""
        if not self.rmsnorm:
            return y * F.silu(z.to(y.dtype))
        if fast and rmsnorm_fn is not None:
            return rmsnorm_fn(
                y,
                self.norm.weight,
                None,
                z=z,
                eps=self.norm.eps,
                group_size=self.norm.group_size,
                norm_before_gate=self.norm_before_gate,
            )
        return self.norm(y, z)

    def _conv_step_pure(self, xBC: Tensor, conv_state: Tensor) -> Tensor:
        """One conv step: xBC (B, conv_dim) is pushed into conv_state (B, conv_dim, d_conv) in place."""
        cdtype = torch.promote_types(xBC.dtype, torch.float32)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        weight = rearrange(self.conv1d.weight, "d 1 w -> d w").to(cdtype)  # (conv_dim, d_conv)
        out = torch.sum(conv_state.to(cdtype) * weight, dim=-1)  # (B, conv_dim)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias.to(cdtype)
        return F.silu(out)

    # ----------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        u: Tensor,
        mask: Tensor | None = None,
        initial_state: tuple[Tensor, Tensor] | None = None,
        return_final_state: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Mix a whole sequence.

        Args:
            u: (B, L, d_model), any L >= 1.
            mask: optional (B, L) bool, True at real tokens. Masked positions leave both states untouched and
                feed zeros to later conv windows, so a LEFT-padded sample matches the unpadded sample at its
                real positions. Outputs at masked positions are finite but meaningless. (Right padding also
                keeps the SSM state, but shifts zeros into the returned conv_state.)
            initial_state: optional (conv_state (B, conv_dim, d_conv), ssm_state (B, nheads, headdim, d_state))
                carried from a previous segment; conv_state holds its last d_conv raw (pre-conv) x, B, C inputs,
                oldest first. Processing [a; b] equals processing a, then b with a's final state.
            return_final_state: also return the states after the last position.
        Returns:
            y (B, L, d_model), or (y, (conv_state, ssm_state)) if return_final_state. Returned states take the
            dtypes of initial_state when given, else (conv1d.weight.dtype, fp32 or fp64 for fp64 models).
        """
        batch, seqlen, _ = u.shape
        fast = self._fast(u)
        conv_state, ssm_state = initial_state if initial_state is not None else (None, None)

        zxbcdt = self.in_proj(u)  # (B, L, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if mask is not None:
            # Zero padding before the conv: later windows then see zeros, exactly as at the sequence start.
            xBC = xBC * mask[..., None].to(xBC.dtype)
        cdtype = torch.promote_types(zxbcdt.dtype, torch.float32)
        conv_dtype = conv_state.dtype if conv_state is not None else self.conv1d.weight.dtype
        ssm_dtype = ssm_state.dtype if ssm_state is not None else cdtype

        # The pure path does its math in cdtype whatever autocast says: long products of decays in bf16 drift.
        with torch.autocast(device_type=u.device.type, enabled=False):
            xBC_t = xBC.transpose(1, 2)  # (B, conv_dim, L)
            if not fast:
                xBC_t = xBC_t.to(cdtype)
            if conv_state is not None:
                # Only the last d_conv - 1 inputs reach the first new output.
                xBC_t = torch.cat([conv_state[..., 1:].to(xBC_t.dtype), xBC_t], dim=-1)  # (B, conv_dim, W-1+L)
            final_conv_state = None
            if return_final_state:
                # F.pad left-pads with zeros when there are fewer than d_conv columns, and crops otherwise.
                final_conv_state = F.pad(xBC_t, (self.d_conv - xBC_t.shape[-1], 0)).to(conv_dtype)  # (B, D, W)

            if fast and causal_conv1d_fn is not None and self.d_conv in CAUSAL_CONV1D_WIDTHS:
                weight = rearrange(self.conv1d.weight, "d 1 w -> d w")  # (conv_dim, d_conv)
                xBC_t = causal_conv1d_fn(xBC_t, weight, bias=self.conv1d.bias, activation="silu")[..., -seqlen:]
            else:
                if conv_state is None:
                    xBC_t = F.pad(xBC_t, (self.d_conv - 1, 0))  # (B, conv_dim, W-1+L)
                weight = self.conv1d.weight.to(xBC_t.dtype)  # (conv_dim, 1, d_conv)
                bias = None if self.conv1d.bias is None else self.conv1d.bias.to(xBC_t.dtype)
                xBC_t = F.silu(F.conv1d(xBC_t, weight, bias, groups=self.conv_dim))  # (B, conv_dim, L)
            xBC = xBC_t.transpose(1, 2)  # (B, L, conv_dim)

            x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
            if mask is not None:
                x = x * mask[..., None].to(x.dtype)
            dt = self._dt(dt, mask)  # (B, L, H), fp32+
            A = -torch.exp(self.A_log.to(dt.dtype))  # (H,)
            x = rearrange(x, "b l (h p) -> b l h p", p=self.headdim)  # (B, L, H, P)
            B = rearrange(B, "b l (g n) -> b l g n", g=self.ngroups)  # (B, L, G, N)
            C = rearrange(C, "b l (g n) -> b l g n", g=self.ngroups)  # (B, L, G, N)

            if fast:
                # dt arrives discretised (softplus, limit and mask applied), so the kernel adds nothing to it.
                out = mamba_chunk_scan_combined(
                    x,
                    dt,
                    A,
                    B,
                    C,
                    chunk_size=self.chunk_size,
                    D=self.D,
                    z=None,
                    dt_bias=None,
                    initial_states=ssm_state,
                    dt_softplus=False,
                    return_final_states=return_final_state,
                )
                y, final_ssm_state = out if return_final_state else (out, None)
            else:
                chunk = min(self.chunk_size, PURE_PATH_MAX_CHUNK, seqlen)
                y, final_ssm_state = _ssd_chunked(
                    x * dt[..., None],
                    A * dt,
                    B,
                    C,
                    chunk,
                    None if ssm_state is None else ssm_state.to(cdtype),
                )  # (B, L, H, P), (B, H, P, N)
                y = y + self.D.to(cdtype)[:, None] * x
            y = rearrange(y, "b l h p -> b l (h p)")  # (B, L, d_inner)
            y = self._gate_norm(y, z, fast)

        out = self.out_proj(y.to(zxbcdt.dtype))  # (B, L, d_model)
        if not return_final_state:
            return out
        return out, (final_conv_state, final_ssm_state.to(ssm_dtype))

    # ----------------------------------------------------------------------------------------------- decoding

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One recurrent step, O(1) in the sequence length.

        Args:
            u: (B, 1, d_model) or (B, d_model).
            conv_state: (B, conv_dim, d_conv), last d_conv raw x, B, C inputs, oldest first. Updated in place.
            ssm_state: (B, nheads, headdim, d_state), fp32 recommended. Updated in place.
        Returns:
            (y, conv_state, ssm_state) with y of u's rank: (B, 1, d_model) or (B, d_model).
        """
        squeeze = u.dim() == 3
        if squeeze:
            if u.shape[1] != 1:
                raise ValueError(f"step takes one token, got u of shape {tuple(u.shape)}")
            u = u[:, 0]
        fast = self._fast(u)

        zxbcdt = self.in_proj(u)  # (B, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        cdtype = torch.promote_types(zxbcdt.dtype, torch.float32)

        with torch.autocast(device_type=u.device.type, enabled=False):
            if fast and causal_conv1d_update is not None and self.d_conv in CAUSAL_CONV1D_WIDTHS:
                weight = rearrange(self.conv1d.weight, "d 1 w -> d w")  # (conv_dim, d_conv)
                xBC = causal_conv1d_update(xBC.to(conv_state.dtype), conv_state, weight, self.conv1d.bias, "silu")
            else:
                xBC = self._conv_step_pure(xBC, conv_state)  # (B, conv_dim)
            x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
            dt = self._dt(dt)  # (B, H), fp32+
            A = -torch.exp(self.A_log.to(dt.dtype))  # (H,)
            x = rearrange(x, "b (h p) -> b h p", p=self.headdim)  # (B, H, P)
            B = rearrange(B, "b (g n) -> b g n", g=self.ngroups)  # (B, G, N)
            C = rearrange(C, "b (g n) -> b g n", g=self.ngroups)  # (B, G, N)

            if fast:
                # dt arrives discretised, so the kernel's bias is zero. It must still be a tensor: mamba_ssm 2.3 reads
                # dt_bias's strides unconditionally (None raised AttributeError on the first step). Stride 0 like
                # dt and A, so the kernel loads one value per head (its `tie_hdim` path).
                zero_bias = dt.new_zeros(()).expand(self.nheads, self.headdim)
                y = selective_state_update(
                    ssm_state,
                    x,
                    repeat(dt, "b h -> b h p", p=self.headdim),
                    repeat(A, "h -> h p n", p=self.headdim, n=self.d_state),
                    B,
                    C,
                    D=repeat(self.D, "h -> h p", p=self.headdim),
                    z=None,
                    dt_bias=zero_bias,
                    dt_softplus=False,
                )  # (B, H, P)
            else:
                x = x.to(cdtype)
                r = self.nheads // self.ngroups
                B = repeat(B.to(cdtype), "b g n -> b (g r) n", r=r)  # (B, H, N)
                C = repeat(C.to(cdtype), "b g n -> b (g r) n", r=r)  # (B, H, N)
                dA = torch.exp(dt * A)  # (B, H)
                if ssm_state.dtype == cdtype and not torch.compiler.is_compiling():
                    # In place: the state is the largest tensor of a step (4 MiB per layer and sample at d_state
                    # 512), so touching it twice instead of through temporaries is most of the step's cost.
                    # (Under torch.compile the broadcast form below is better: inductor fuses it into few passes.)
                    Bsz, H = dA.shape
                    flat = ssm_state.view(Bsz * H, self.headdim, self.d_state)  # (B*H, P, N)
                    ssm_state.mul_(dA[..., None, None])
                    flat.baddbmm_((x * dt[..., None]).reshape(Bsz * H, self.headdim, 1), B.reshape(Bsz * H, 1, -1))
                    y = torch.bmm(flat, C.reshape(Bsz * H, -1, 1)).view(Bsz, H, self.headdim)  # (B, H, P)
                    y = y + self.D.to(cdtype)[:, None] * x
                else:
                    # y = h' C with h' = dA h + (x dt) B, written as dA (h C) + (x dt)(B . C): the output and the new
                    # state both come from the old state. Read off h', y made inductor write every layer's new state
                    # to a temporary as well and read it back (~10% slower compiled step at bench/generate.py's size).
                    xdt = x * dt[..., None]  # (B, H, P)
                    old = ssm_state.to(cdtype)  # (B, H, P, N)
                    y = dA[..., None] * (old * C[:, :, None, :]).sum(-1) + xdt * (B * C).sum(-1)[..., None]
                    ssm_state.copy_(old * dA[..., None, None] + xdt[..., None] * B[:, :, None, :])
                    y = y + self.D.to(cdtype)[:, None] * x  # (B, H, P)
            y = rearrange(y, "b h p -> b (h p)")  # (B, d_inner)
            y = self._gate_norm(y, z, fast)

        out = self.out_proj(y.to(zxbcdt.dtype))  # (B, d_model)
        return (out[:, None] if squeeze else out), conv_state, ssm_state

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero decoding states (on huge pages on the CPU: `modeling.pages.zeros`); their size does not depend on
        max_seqlen (kept for mamba_ssm's signature).

        Args:
            batch_size: B.
            dtype: conv_state dtype (default conv1d.weight's): it only stores raw projections, exactly.
            device: default the module's.
            ssm_dtype: ssm_state dtype, default fp32 (fp64 for fp64 models): the state is a product of
                thousands of decays and updates, and rounding it to bf16 every token drifts.
        Returns:
            conv_state (B, conv_dim, d_conv), ssm_state (B, nheads, headdim, d_state).
        """
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        conv_state = pages.zeros(
            batch_size, self.conv_dim, self.d_conv, device=device, dtype=weight.dtype if dtype is None else dtype
        )
        if ssm_dtype is None:
            ssm_dtype = torch.promote_types(weight.dtype, torch.float32)
        ssm_state = pages.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state
