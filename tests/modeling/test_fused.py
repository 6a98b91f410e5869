"""The fused C++ decoding step (modeling/fused.py, fused_step.cpp) against the eager step, its vector math against
torch in float64, and the models and calls it refuses.

Sizes are chosen so that every loop runs both its vector part (16 floats) and its scalar tail: the tiny test
model's widths (8, 16, 32, 64) and an odd one (widths 24, 40, 48, 20, 80).
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from modeling import fused as fused_module
from modeling.fused import (
    BUILD_DIR_ENV,
    MAX_ROWS,
    FusedStep,
    FusedStepError,
    _cache_dir,
    _library,
    build_problem,
    fused_problem,
    kernel_math,
)
from modeling.layers import state_tensors
from modeling.lm import with_null_condition
from tests.conftest import random_text, tiny_model

pytestmark = pytest.mark.skipif(build_problem() is not None, reason=str(build_problem()))

# Vector loops with tails everywhere: K = 48 (32 + 16), d_state 20 (16 + 4), headdim 24, mlp 80, 2 groups.
ODD = dict(d_model=48, mlp_dim=80, d_state=20, headdim=24, n_layers=3)
# The SSM update in every block size it has (d_state 164 = a block of 8 vectors, one of 2, and 4 left over), and a
# conv width other than Mamba's 4 (the kernel's generic conv loop).
WIDE_STATE = dict(ODD, d_state=164, d_conv=3)
# Products over more than 8 rows in tiles of 3 weight rows x 8 activation rows: in_proj's, fc1's and the head's
# K = 40 leaves a tail of 8 in their dot products, and out_proj's 40 weight rows leave one row past the tiles.
NARROW_K = dict(ODD, d_model=40, headdim=20)


@pytest.fixture
def threads():
    """Sets torch's thread count for one test (the fused kernel uses as many), restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _prompt(rows: int, vocab: int, steps: int):
    """Captions of different lengths for `rows` rows (an even count: captions + their null twins, as CFG runs)."""
    captions = rows // 2 if rows % 2 == 0 else rows
    text, mask = random_text([3, 5, 2, 6, 4, 1, 7, 2, 3, 5, 2, 6, 4, 1][:captions], seed=7)
    if rows % 2 == 0:
        text, mask = with_null_condition(text, mask)
    tokens = torch.randint(0, vocab - 1, (rows, steps + 2), generator=torch.Generator().manual_seed(rows))
    tokens[:, 0] = vocab - 1
    return tokens, text, mask


@pytest.mark.parametrize(
    "config, rows, n_threads",
    [
        ({}, 4, 2),
        ({}, 1, 1),
        (ODD, 2, 2),
        (ODD, 3, 1),
        (dict(ODD, ngroups=2), 8, 2),
        (ODD, 14, 2),
        (WIDE_STATE, 2, 2),
        (WIDE_STATE, 3, 3),
        (NARROW_K, 9, 2),
        (NARROW_K, 12, 3),
    ],
    ids=[
        "tiny-4rows",
        "tiny-1row-1thread",
        "odd-2rows",
        "odd-3rows-1thread",
        "groups-8rows",
        "odd-14rows-blocked",
        "wide-state-2rows",
        "wide-state-3rows-3threads",
        "narrow-k-9rows-tiles",
        "narrow-k-12rows-3threads-tiles",
    ],
)
@torch.no_grad()
def test_fused_step_equals_the_eager_step(config, rows, n_threads, threads):
    """Teacher-forced steps from one prefill: the same logits, conv and SSM states and positions, every step."""
    threads(n_threads)
    model = tiny_model("simba", seed=2, **config)
    _assert_steps_match(model, FusedStep(model), rows)


def _assert_steps_match(model, fused: FusedStep, rows: int, steps: int = 8) -> None:
    """Teacher-forced steps of `fused` and of the eager step from one prefill: the same logits, conv and SSM states
    and positions, every step."""
    tokens, text, mask = _prompt(rows, model.vocab_size, steps)
    _, eager_state = model.prefill(tokens[:, :2], text, mask, max_len=steps + 4)
    fused_state = copy.deepcopy(eager_state)
    worst_logits = worst_state = 0.0
    for t in range(2, steps + 2):
        eager = model.step(tokens[:, t], eager_state)
        got = fused(tokens[:, t], fused_state)
        worst_logits = max(worst_logits, ((got - eager).abs().max() / eager.abs().max()).item())
        for a, b in zip(state_tensors(eager_state), state_tensors(fused_state), strict=True):
            if a.dtype == torch.int64:
                assert torch.equal(a, b)  # next_pos
            else:
                worst_state = max(worst_state, ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item())
    print(f"max relative difference: logits {worst_logits:.1e}, states {worst_state:.1e}")
    assert worst_logits < 1e-5 and worst_state < 1e-5


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set flags")
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx",)], ids=["avx2-8-lanes", "sse-4-lanes"])
@pytest.mark.parametrize("config, rows", [(WIDE_STATE, 2), (NARROW_K, 9)], ids=["wide-state", "narrow-k-tiles"])
@torch.no_grad()
def test_the_kernel_built_for_narrower_vectors_equals_the_eager_step(flags, config, rows, threads):
    """The kernel takes the machine's vector width (16 floats with AVX-512, 8 with AVX2, 4 with SSE or NEON) and
    sizes its register blocks to it: the builds an AVX2-only or SSE-only CPU gets, compiled here."""
    threads(2)
    model = tiny_model("simba", seed=2, **config)
    fused = FusedStep(model)
    fused._library = _library(flags)
    _assert_steps_match(model, fused, rows)


@torch.no_grad()
def test_fused_steps_reproduce_the_full_forward():
    model = tiny_model("simba", seed=3, **ODD)
    tokens, text, mask = _prompt(2, model.vocab_size, 10)
    full = model(tokens, text, mask).logits  # (2, T, V)
    logits, state = model.prefill(tokens[:, :1], text, mask, max_len=tokens.shape[1])
    fused = FusedStep(model)
    got = torch.stack([logits] + [fused(tokens[:, t], state) for t in range(1, tokens.shape[1])], dim=1)
    assert torch.allclose(got, full, atol=1e-5 * full.abs().max().item()), (got - full).abs().max()


@pytest.mark.parametrize("name", ["exp", "silu", "gelu"])
def test_vector_math_matches_torch_in_float64(name):
    """The kernel's polynomial exp (and the SiLU and GELU built on it) over [-100, 100], dense near 0."""
    x = torch.cat([torch.linspace(-100, 100, 20_001), torch.linspace(-6, 6, 24_001), torch.tensor([0.0, -0.0])])
    x = x[: x.numel() - x.numel() % 16 + 5]  # a scalar tail too
    got = kernel_math(name, x).double()
    xd = x.double()
    if name == "exp":
        inside = (xd > -87.3) & (xd < 88.3)  # the vector code clamps outside, as documented
        want, got, xd = xd[inside].exp(), got[inside], xd[inside]
    elif name == "silu":
        want = torch.nn.functional.silu(xd)
    else:
        # The textbook form: x/2 (1 + erf(x/sqrt 2)) = x/2 erfc(-x/sqrt 2). torch's own gelu computes 1 + erf, which
        # cancels to 0 below x = -8 even in float64 (and below -5.5 in float32, where the kernel is closer).
        want = xd / 2 * torch.special.erfc(-xd / 2**0.5)
    # Relative to the value; where it is below 1e-6 (the tails), absolute. GELU's relative error grows with x^2 (the
    # rounding of exp(-x^2 / 2)'s argument) to 2e-6 at x = -5 (torch's float32 GELU is 17% off there).
    big = want.abs() >= 1e-6
    relative, tails = ((got - want).abs() / want.abs())[big], (got - want)[~big].abs()
    print(f"{name}: max relative error {relative.max():.2e}, max absolute in the tails {tails.max():.1e}")
    assert relative.max() < {"exp": 1e-6, "silu": 1e-6, "gelu": 4e-6}[name]
    assert tails.max() < 1e-11


@pytest.mark.parametrize("arch, reason", [("transformer", "not a Mamba-2 block"), ("hybrid", "layer 1")])
def test_models_with_attention_are_refused_with_the_reason(arch, reason):
    model = tiny_model(arch)
    assert reason in fused_problem(model)
    with pytest.raises(FusedStepError, match=reason):
        FusedStep(model)


def test_other_dtypes_and_shapes_are_refused():
    assert "fp32 weights on the CPU" in fused_problem(tiny_model("simba").to(torch.bfloat16))
    model = tiny_model("simba")
    model.token_emb = torch.nn.Embedding(model.vocab_size - 1, model.d_model)  # the kernel indexes it by the head's
    assert "token embedding" in fused_problem(model)


@torch.no_grad()
def test_bad_calls_are_errors_not_crashes():
    model = tiny_model("simba")
    fused = FusedStep(model)
    tokens, text, mask = _prompt(2, model.vocab_size, 2)
    _, state = model.prefill(tokens[:, :1], text, mask, max_len=8)
    with pytest.raises(FusedStepError, match="outside the vocabulary"):
        fused(torch.tensor([0, model.vocab_size]), state)
    with pytest.raises(FusedStepError, match="another batch"):
        fused(torch.zeros(4, dtype=torch.long), state)  # a state for 2 rows
    wrong = model.allocate_state(2, 8)
    wrong.layers[0].mixer.ssm_state = wrong.layers[0].mixer.ssm_state[..., :-1].contiguous()  # d_state - 1
    with pytest.raises(FusedStepError, match="need"):
        fused(tokens[:, 1], wrong)
    many = MAX_ROWS + 1
    with pytest.raises(FusedStepError, match=f"1..{MAX_ROWS} rows, got {many}"):
        fused(torch.zeros(many, dtype=torch.long), model.allocate_state(many, 8))
    before = state.next_pos.clone()
    fused(tokens[:, 1], state)  # the refused calls left the state as it was
    assert torch.equal(state.next_pos, before + 1)


def test_the_build_is_kept_for_the_next_process(monkeypatch, tmp_path):
    library = _library()
    assert library._name.startswith(str(_cache_dir()))  # conftest points the cache into a temporary folder
    monkeypatch.setenv(BUILD_DIR_ENV, str(tmp_path / "builds"))
    assert _cache_dir() == tmp_path / "builds"
    monkeypatch.delenv(BUILD_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_dir() == tmp_path / "xdg" / "simba-ttm" / "fused"


@pytest.fixture(params=["torch's C++ loop", "the Python loop"])
def address_check(request, monkeypatch):
    """Runs a test with the address comparison each way it can run (torch's private C++ loop may go away)."""
    if request.param == "the Python loop":
        monkeypatch.setattr(fused_module, "_ADDRESSES_EQUAL", None)
    elif fused_module._ADDRESSES_EQUAL is None:
        pytest.skip("this torch has no _tensors_data_ptrs_at_indices_equal")
    return request.param


@torch.no_grad()
def test_replaced_weights_reach_the_kernel(address_check):
    """Parameter addresses are compared before every call: a `.data` swap (what `module.to` does) is not missed."""
    model = tiny_model("simba", seed=4, **ODD)
    fused = FusedStep(model)
    tokens, text, mask = _prompt(2, model.vocab_size, 2)
    _, eager_state = model.prefill(tokens[:, :1], text, mask, max_len=8)
    fused_state = copy.deepcopy(eager_state)
    fused(tokens[:, 1], copy.deepcopy(fused_state))  # pointers taken
    fc1 = model.layers[1].mlp.fc1.weight
    fc1.data = torch.randn_like(fc1) * 0.2  # new memory; the old is freed
    eager = model.step(tokens[:, 1], eager_state)
    assert torch.allclose(fused(tokens[:, 1], fused_state), eager, atol=1e-5 * eager.abs().max().item())


@torch.no_grad()
def test_a_replaced_state_tensor_is_checked_again_and_used(address_check):
    """The state's tensors are checked in full only when they are not the last call's objects at its addresses: a
    tensor swapped in between calls, or given new memory through `.data`, is checked and its memory is the one
    written."""
    model = tiny_model("simba", seed=5, **ODD)
    fused = FusedStep(model)
    tokens, text, mask = _prompt(2, model.vocab_size, 4)
    _, state = model.prefill(tokens[:, :1], text, mask, max_len=8)
    eager_state = copy.deepcopy(state)
    fused(tokens[:, 1], state)
    model.step(tokens[:, 1], eager_state)
    mixer = state.layers[1].mixer
    good = mixer.ssm_state
    mixer.ssm_state = good[..., :-1].contiguous()  # d_state - 1, in the same DecodeState
    with pytest.raises(FusedStepError, match="need"):
        fused(tokens[:, 2], state)
    mixer.ssm_state = good.clone()  # right shape, new memory
    eager = model.step(tokens[:, 2], eager_state)
    assert torch.allclose(fused(tokens[:, 2], state), eager, atol=1e-5 * eager.abs().max().item())
    conv = state.layers[0].mixer.conv_state
    conv.data = conv.clone()  # the same object, new memory (the old is freed)
    eager = model.step(tokens[:, 3], eager_state)
    assert torch.allclose(fused(tokens[:, 3], state), eager, atol=1e-5 * eager.abs().max().item())
    for mine, theirs in zip(state_tensors(state), state_tensors(eager_state), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5 * max(theirs.abs().max().item(), 1.0))


@torch.no_grad()
def test_a_state_or_weight_changed_under_the_same_address_is_refused(address_check):
    """Addresses alone do not vouch for a state: a `.data` swap to a view at the same address (or to new memory that
    malloc put where the old was) keeps the object and the address. The state's shapes and its layer count are checked
    on every call, the weights' shapes whenever one moved."""
    model = tiny_model("simba", seed=6, **ODD)  # headdim 24, d_state 20: a transposed SSM state has another shape
    fused = FusedStep(model)
    tokens, text, mask = _prompt(2, model.vocab_size, 3)
    _, state = model.prefill(tokens[:, :1], text, mask, max_len=8)
    fused(tokens[:, 1], state)
    ssm = state.layers[0].mixer.ssm_state
    address = ssm.data_ptr()
    ssm.data = ssm.data.transpose(-1, -2)  # the same object at the same address, (2, H, N, P)
    assert ssm.data_ptr() == address
    with pytest.raises(FusedStepError, match="need"):
        fused(tokens[:, 2], state)
    ssm.data = ssm.data.transpose(-1, -2)
    fused(tokens[:, 2], state)  # as it was: accepted again
    short = copy.deepcopy(state)
    short.layers = short.layers[:1]
    with pytest.raises(FusedStepError, match="1 layers for a model of 3"):
        fused(tokens[:, 3], short)
    fc2 = model.layers[2].mlp.fc2.weight
    fc2.data = fc2.data[:, :-8].clone()  # new memory, one column block short
    with pytest.raises(FusedStepError, match="build a new step"):
        fused(tokens[:, 3], state)
