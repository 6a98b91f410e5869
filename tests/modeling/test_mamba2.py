"""Mamba2 against an independent per-timestep recurrence, plus state-carrying, decoding and padding checks."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from modeling.mamba2 import Mamba2

D_MODEL, D_STATE, HEADDIM, CHUNK, SEQLEN = 32, 16, 8, 8, 37  # 8 heads; 37 is not a multiple of the chunk


def make_mamba(dtype=torch.float32, seed=0, **kwargs) -> Mamba2:
    torch.manual_seed(seed)
    cfg = dict(d_state=D_STATE, headdim=HEADDIM, chunk_size=CHUNK) | kwargs
    m = Mamba2(D_MODEL, **cfg).to(dtype)
    with torch.no_grad():
        # Move D, the norm weight and the biases off their init values so every term shows in the comparison.
        m.D.uniform_(0.5, 1.5)
        if m.rmsnorm:
            m.norm.weight.uniform_(0.5, 1.5)
        for lin in (m.in_proj, m.out_proj):
            if lin.bias is not None:
                lin.bias.normal_(0, 0.1)
    return m


def naive_mamba2(m: Mamba2, u, mask=None, conv_state=None, ssm_state=None):
    """Full Mamba2 forward as a per-token loop over m's parameters, sharing no code with the module.

    Returns y (B, L, d_model), conv_state (B, conv_dim, d_conv), ssm_state (B, H, P, N).
    """
    batch, seqlen, _ = u.shape
    H, P, N, G, W = m.nheads, m.headdim, m.d_state, m.ngroups, m.d_conv
    d_inner = m.expand * m.d_model
    conv_dim = d_inner + 2 * G * N
    proj = u @ m.in_proj.weight.T
    if m.in_proj.bias is not None:
        proj = proj + m.in_proj.bias
    assert proj.shape[-1] == d_inner + conv_dim + H
    z, xbc, dt_raw = proj[..., :d_inner], proj[..., d_inner : d_inner + conv_dim], proj[..., d_inner + conv_dim :]
    keep = torch.ones(batch, seqlen, dtype=u.dtype) if mask is None else mask.to(u.dtype)
    xbc = xbc * keep[..., None]
    window = torch.zeros(batch, conv_dim, W, dtype=u.dtype) if conv_state is None else conv_state.to(u.dtype)
    state = torch.zeros(batch, H, P, N, dtype=u.dtype) if ssm_state is None else ssm_state.to(u.dtype)
    A = -torch.exp(m.A_log)  # (H,)
    group_of_head = torch.arange(H) // (H // G)
    w = m.conv1d.weight[:, 0, :]  # (conv_dim, W)
    outs = []
    for t in range(seqlen):
        window = torch.cat([window[:, :, 1:], xbc[:, t, :, None]], dim=-1)
        c = (window * w).sum(-1)
        if m.conv1d.bias is not None:
            c = c + m.conv1d.bias
        c = c * torch.sigmoid(c)
        x = c[:, :d_inner].reshape(batch, H, P) * keep[:, t, None, None]
        Bt = c[:, d_inner : d_inner + G * N].reshape(batch, G, N)[:, group_of_head]  # (batch, H, N)
        Ct = c[:, d_inner + G * N :].reshape(batch, G, N)[:, group_of_head]  # (batch, H, N)
        dt = torch.log1p(torch.exp(dt_raw[:, t] + m.dt_bias))  # (batch, H)
        if m.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(m.dt_limit[0], m.dt_limit[1])
        dt = dt * keep[:, t, None]
        state = state * torch.exp(dt * A)[:, :, None, None] + dt[:, :, None, None] * x[..., None] * Bt[:, :, None, :]
        y = (state * Ct[:, :, None, :]).sum(-1) + m.D[:, None] * x  # (batch, H, P)
        y = y.reshape(batch, d_inner)
        gate = z[:, t] * torch.sigmoid(z[:, t])
        if not m.rmsnorm:
            y = y * gate
        else:
            if not m.norm_before_gate:
                y = y * gate
            yg = y.reshape(batch, G, d_inner // G)
            y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(batch, d_inner) * m.norm.weight
            if m.norm_before_gate:
                y = y * gate
        o = y @ m.out_proj.weight.T
        if m.out_proj.bias is not None:
            o = o + m.out_proj.bias
        outs.append(o)
    return torch.stack(outs, dim=1), window, state


def check_close(name, actual, expected, atol, rtol):
    diff = (actual.double() - expected.double()).abs().max().item()
    print(f"{name}: max |diff| = {diff:.3e} (max |ref| = {expected.abs().max().item():.3e})")
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=f"{name}: {diff:.3e}")


TOLS = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-3)}


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_forward_and_grads_match_naive_recurrence(dtype, ngroups):
    m = make_mamba(dtype, ngroups=ngroups)
    ref = copy.deepcopy(m).double()  # the reference always runs in fp64
    torch.manual_seed(1)
    u = torch.randn(2, SEQLEN, D_MODEL, dtype=dtype, requires_grad=True)
    u_ref = u.detach().double().requires_grad_()
    g = torch.randn(2, SEQLEN, D_MODEL, dtype=torch.float64)

    y, (conv_state, ssm_state) = m(u, return_final_state=True)
    y_ref, conv_ref, ssm_ref = naive_mamba2(ref, u_ref)
    tol = TOLS[dtype]
    check_close("y", y, y_ref, **tol)
    check_close("conv_state", conv_state, conv_ref, **tol)
    check_close("ssm_state", ssm_state, ssm_ref, **tol)

    (y.double() * g).sum().backward()
    (y_ref * g).sum().backward()
    check_close("grad u", u.grad, u_ref.grad, **tol)
    params_ref = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        check_close(f"grad {name}", p.grad, params_ref[name].grad, **tol)


@pytest.mark.parametrize(
    "variant",
    [
        dict(dt_limit=(0.01, 0.05)),
        dict(norm_before_gate=True, ngroups=2),
        dict(rmsnorm=False),
        dict(bias=True, conv_bias=False),
    ],
    ids=["dt_limit", "norm_before_gate", "no_rmsnorm", "bias"],
)
def test_variants_match_naive_recurrence(variant):
    m = make_mamba(torch.float64, **variant)
    u = torch.randn(2, SEQLEN, D_MODEL, dtype=torch.float64)
    check_close("y", m(u), naive_mamba2(m, u)[0], **TOLS[torch.float64])


def test_strong_decay_matches_naive_in_fp32():
    # dt up to 4 and A up to -16: per-step log decays near -64, within-chunk cumulative sums near -1000, where
    # exp of differences of cumulative sums would overflow or cancel.
    m = make_mamba(dt_min=0.5, dt_max=4.0, chunk_size=16)
    ref = copy.deepcopy(m).double()
    u = torch.randn(2, SEQLEN, D_MODEL, requires_grad=True)
    y = m(u)
    y_ref = naive_mamba2(ref, u.detach().double())[0]
    check_close("y", y, y_ref, **TOLS[torch.float32])
    (grad,) = torch.autograd.grad(y.sum(), u)
    assert torch.isfinite(grad).all()


def test_initial_state_and_mask_match_naive_recurrence():
    m = make_mamba(torch.float64, ngroups=2)
    torch.manual_seed(2)
    u = torch.randn(3, SEQLEN, D_MODEL, dtype=torch.float64, requires_grad=True)
    conv_state = torch.randn(3, m.conv_dim, m.d_conv, dtype=torch.float64, requires_grad=True)
    ssm_state = torch.randn(3, m.nheads, m.headdim, m.d_state, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, SEQLEN, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 10:14] = False  # a hole in the middle
    y, (conv_out, ssm_out) = m(u, mask=mask, initial_state=(conv_state, ssm_state), return_final_state=True)
    y_ref, conv_ref, ssm_ref = naive_mamba2(m, u, mask=mask, conv_state=conv_state, ssm_state=ssm_state)
    tol = TOLS[torch.float64]
    check_close("y", y, y_ref, **tol)
    check_close("conv_state", conv_out, conv_ref, **tol)
    check_close("ssm_state", ssm_out, ssm_ref, **tol)
    inputs = (u, conv_state, ssm_state)
    grads = torch.autograd.grad((y.sum() + ssm_out.sum()), inputs)
    grads_ref = torch.autograd.grad((y_ref.sum() + ssm_ref.sum()), inputs)
    for name, a, b in zip(("u", "conv_state", "ssm_state"), grads, grads_ref, strict=True):
        check_close(f"grad {name}", a, b, **tol)


def test_chunk_size_does_not_change_output():
    m = make_mamba(ngroups=2)
    u = torch.randn(2, SEQLEN, D_MODEL)
    outs = {}
    for chunk in (4, 8, 64):
        m.chunk_size = chunk
        outs[chunk] = m(u, return_final_state=True)
    for chunk in (4, 64):
        check_close(f"y chunk {chunk} vs 8", outs[chunk][0], outs[8][0], atol=1e-5, rtol=1e-4)
        check_close(f"ssm_state chunk {chunk} vs 8", outs[chunk][1][1], outs[8][1][1], atol=1e-5, rtol=1e-4)


def test_the_pure_path_caps_its_chunk_and_the_output_stays(monkeypatch):
    """chunk_size 256 runs as chunks of PURE_PATH_MAX_CHUNK (64) on the pure path: the same output as 256 would
    give (the SSD with chunk 256 called directly), in less time (see the constant's comment)."""
    import modeling.mamba2 as mamba2_module

    chunks = []
    real = mamba2_module._ssd_chunked

    def spy(*args):
        chunks.append(args[4])
        return real(*args)

    monkeypatch.setattr(mamba2_module, "_ssd_chunked", spy)
    m = make_mamba(chunk_size=256)
    u = torch.randn(1, 300, D_MODEL)
    y = m(u)
    assert chunks == [mamba2_module.PURE_PATH_MAX_CHUNK] == [64]
    m.chunk_size = 8  # below the cap: used as configured
    m(u)
    assert chunks[-1] == 8
    monkeypatch.setattr(mamba2_module, "PURE_PATH_MAX_CHUNK", 256)  # what the old code ran
    m.chunk_size = 256
    check_close("y chunk 64 vs 256", y, m(u), atol=1e-5, rtol=1e-4)
    assert chunks[-1] == 256


@pytest.mark.parametrize("split", [2, 13, 30])
def test_carried_state_equals_one_pass(split):
    m = make_mamba()
    torch.manual_seed(3)
    u = torch.randn(2, SEQLEN, D_MODEL, requires_grad=True)
    y_full, (conv_full, ssm_full) = m(u, return_final_state=True)
    y_a, state_a = m(u[:, :split], return_final_state=True)
    y_b, (conv_b, ssm_b) = m(u[:, split:], initial_state=state_a, return_final_state=True)
    y_cat = torch.cat([y_a, y_b], dim=1)
    check_close("y", y_cat, y_full, atol=1e-5, rtol=1e-4)
    check_close("conv_state", conv_b, conv_full, atol=1e-6, rtol=0)  # in_proj may round differently per shape
    check_close("ssm_state", ssm_b, ssm_full, atol=1e-5, rtol=1e-4)
    # Gradients flow back through the carried state as through the one pass.
    g = torch.randn_like(y_full)
    (grad_full,) = torch.autograd.grad((y_full * g).sum(), u)
    (grad_split,) = torch.autograd.grad((y_cat * g).sum(), u)
    check_close("grad u", grad_split, grad_full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_by_step_equals_forward(ngroups):
    m = make_mamba(ngroups=ngroups)
    u = torch.randn(2, SEQLEN, D_MODEL)
    y_full, (conv_full, ssm_full) = m(u, return_final_state=True)
    conv_state, ssm_state = m.allocate_inference_cache(2, SEQLEN)
    assert conv_state.shape == (2, m.conv_dim, m.d_conv) and conv_state.dtype == torch.float32
    assert ssm_state.shape == (2, m.nheads, m.headdim, m.d_state) and ssm_state.dtype == torch.float32
    ys = []
    for t in range(SEQLEN):
        if t % 2:  # both accepted ranks, each returned as given
            y_t, conv_state, ssm_state = m.step(u[:, t], conv_state, ssm_state)
            assert y_t.shape == (2, D_MODEL)
            y_t = y_t[:, None]
        else:
            y_t, conv_state, ssm_state = m.step(u[:, t : t + 1], conv_state, ssm_state)
            assert y_t.shape == (2, 1, D_MODEL)
        ys.append(y_t)
    check_close("y", torch.cat(ys, dim=1), y_full, atol=1e-5, rtol=1e-4)
    check_close("conv_state", conv_state, conv_full, atol=1e-6, rtol=0)  # in_proj may round differently per shape
    check_close("ssm_state", ssm_state, ssm_full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("prefix", [2, 20])
def test_prefill_then_steps_equals_forward(prefix):
    m = make_mamba(ngroups=2)
    u = torch.randn(2, SEQLEN, D_MODEL)
    y_full = m(u)
    y_pre, (conv_state, ssm_state) = m(u[:, :prefix], return_final_state=True)
    ys = [y_pre]
    for t in range(prefix, SEQLEN):
        y_t, conv_state, ssm_state = m.step(u[:, t : t + 1], conv_state, ssm_state)
        ys.append(y_t)
    check_close("y", torch.cat(ys, dim=1), y_full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pad", [3, 11])
def test_left_padding_is_invisible(pad):
    m = make_mamba(ngroups=2)
    torch.manual_seed(4)
    alone = torch.randn(1, SEQLEN, D_MODEL)
    other = torch.randn(1, SEQLEN + pad, D_MODEL)
    garbage = 10 * torch.randn(1, pad, D_MODEL)  # large junk in the padded slots: masking must hide it
    u = torch.cat([torch.cat([garbage, alone], dim=1), other]).requires_grad_()
    mask = torch.ones(2, SEQLEN + pad, dtype=torch.bool)
    mask[0, :pad] = False

    y, (conv_state, ssm_state) = m(u, mask=mask, return_final_state=True)
    y_alone, (conv_alone, ssm_alone) = m(alone, return_final_state=True)
    y_other, (conv_other, ssm_other) = m(other, return_final_state=True)
    check_close("y padded", y[:1, pad:], y_alone, atol=1e-5, rtol=1e-4)
    check_close("conv_state padded", conv_state[:1], conv_alone, atol=1e-6, rtol=0)
    check_close("ssm_state padded", ssm_state[:1], ssm_alone, atol=1e-5, rtol=1e-4)
    check_close("y neighbour", y[1:], y_other, atol=1e-5, rtol=1e-4)
    check_close("ssm_state neighbour", ssm_state[1:], ssm_other, atol=1e-5, rtol=1e-4)
    # The padded slots get no gradient from the real positions.
    (grad,) = torch.autograd.grad(y[0, pad:].sum(), u)
    assert grad[0, :pad].abs().max() == 0
    assert grad[0, pad:].abs().max() > 0


def test_bf16_close_to_fp32():
    m = make_mamba()
    u = torch.randn(2, SEQLEN, D_MODEL)
    y32, (_, ssm32) = m(u, return_final_state=True)
    scale = y32.abs().max().item()

    m16 = copy.deepcopy(m).to(torch.bfloat16)
    y16, (conv16, ssm16) = m16(u.bfloat16(), return_final_state=True)
    assert y16.dtype == torch.bfloat16 and conv16.dtype == torch.bfloat16 and ssm16.dtype == torch.float32
    check_close("y bf16 model", y16.float(), y32, atol=0.05 * scale, rtol=0.05)
    check_close("ssm_state bf16 model", ssm16, ssm32, atol=0.05 * ssm32.abs().max().item(), rtol=0.05)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = m(u)
    assert y_auto.dtype == torch.bfloat16
    check_close("y autocast", y_auto.float(), y32, atol=0.05 * scale, rtol=0.05)

    with torch.no_grad():  # bf16 model decoding into an fp32 ssm_state
        conv_state, ssm_state = m16.allocate_inference_cache(2)
        assert conv_state.dtype == torch.bfloat16 and ssm_state.dtype == torch.float32
        ys = [m16.step(u[:, t : t + 1].bfloat16(), conv_state, ssm_state)[0] for t in range(SEQLEN)]
    check_close("y bf16 steps", torch.cat(ys, dim=1).float(), y32, atol=0.05 * scale, rtol=0.05)


def test_parameter_names_shapes_and_init():
    m = Mamba2(1024, d_state=512, headdim=64, device="meta")
    # mamba_ssm: d_inner 2048, 32 heads, conv_dim 2048 + 2 * 512, in_proj 2 * 2048 + 2 * 512 + 32.
    expected = {
        "in_proj.weight": (5152, 1024),
        "conv1d.weight": (3072, 1, 4),
        "conv1d.bias": (3072,),
        "dt_bias": (32,),
        "A_log": (32,),
        "D": (32,),
        "norm.weight": (2048,),
        "out_proj.weight": (1024, 2048),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    no_wd = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_wd == {"dt_bias", "A_log", "D"}

    small = Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM, dt_min=0.01, dt_max=0.05, A_init_range=(2, 4))
    dt = F.softplus(small.dt_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    A = torch.exp(small.A_log)
    assert A.min() >= 2 and A.max() <= 4
    assert torch.equal(small.D, torch.ones(small.nheads)) and torch.equal(small.norm.weight, torch.ones(64))


HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_MAMBA_SSM), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_path_matches_pure_path(dtype):
    import modeling.mamba2 as mamba2_module

    assert mamba2_module.mamba_chunk_scan_combined is not None, "mamba_ssm is installed but did not import"
    m = make_mamba(ngroups=2, d_state=64, headdim=16, chunk_size=64).cuda().to(dtype)
    torch.manual_seed(5)
    seqlen = 203
    u = torch.randn(2, seqlen, D_MODEL, device="cuda", dtype=dtype)
    mask = torch.ones(2, seqlen, dtype=torch.bool, device="cuda")
    mask[0, :17] = False
    g = torch.randn(2, seqlen, D_MODEL, device="cuda", dtype=dtype)
    # Triton uses TF32 for fp32 dots; tolerances are relative to each tensor's largest entry.
    tol = dict(atol=3e-3, rtol=3e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)

    results = {}
    for fast in (True, False):
        m.use_fast_path = fast
        m.zero_grad()
        x = u.clone().requires_grad_()
        y_a, state_a = m(x[:, :100], mask=mask[:, :100], return_final_state=True)
        y_b, (conv_state, ssm_state) = m(x[:, 100:], initial_state=state_a, return_final_state=True)
        y = torch.cat([y_a, y_b], dim=1)
        (y * g).sum().backward()
        with torch.no_grad():
            steps = []
            conv_s, ssm_s = conv_state.clone(), ssm_state.clone()
            for t in range(5):
                y_t, conv_s, ssm_s = m.step(u[:, t : t + 1], conv_s, ssm_s)
                steps.append(y_t)
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        results[fast] = dict(y=y, ssm=ssm_state, steps=torch.cat(steps, 1), step_ssm=ssm_s, grad_u=x.grad, **grads)
    for key, fast_value in results[True].items():
        pure_value = results[False][key]
        scale = pure_value.abs().max().item()
        check_close(key, fast_value.float(), pure_value.float(), atol=tol["atol"] * max(scale, 1.0), rtol=tol["rtol"])
