"""The compiled decoding step (modeling/compiled.py) against the eager step, and its fallback for attention.

One tiny SiMBA is compiled once for the module (4 rows: 2 captions + their unconditional twins, as CFG
generation runs them); compiling costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from modeling.compiled import _mm, _rows_times, compiled_step, cpu_compile_problem, supports_compiled_step
from modeling.lm import with_null_condition
from tests.conftest import random_text, tiny_model

VOCAB = 1025
needs_compiler = pytest.mark.skipif(cpu_compile_problem() is not None, reason=str(cpu_compile_problem()))


@pytest.fixture(scope="module")
def simba():
    return tiny_model("simba", seed=3)


def test_rows_times_is_a_matrix_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 17, generator=g, dtype=torch.float64), torch.randn(17, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(_rows_times(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert _mm(torch.randn(9, 4), torch.randn(4, 2)) is NotImplemented  # more rows than SMALL_ROWS: gemm


@needs_compiler
@torch.no_grad()
def test_compiled_step_equals_eager_step(simba):
    """Teacher-forced: the same tokens through both steps give the same logits and SSM states."""
    text, mask = with_null_condition(*random_text([3, 6], seed=4))  # (4, S, C)
    T = 12
    tokens = torch.randint(0, VOCAB - 1, (4, T), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = VOCAB - 1
    _, eager_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    _, fast_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    step = compiled_step(simba)
    worst = 0.0
    for t in range(1, T):
        eager = simba.step(tokens[:, t], eager_state)
        fast = step(tokens[:, t], fast_state)
        worst = max(worst, (eager - fast).abs().max().item())
    print(f"max |compiled - eager| logits over {T - 1} steps: {worst:.2e}")
    assert worst < 1e-4
    for a, b in zip(eager_state.layers, fast_state.layers, strict=True):
        assert torch.allclose(a.mixer.ssm_state, b.mixer.ssm_state, atol=1e-5)
        assert torch.allclose(a.mixer.conv_state, b.mixer.conv_state, atol=1e-6)
    assert torch.equal(eager_state.next_pos, fast_state.next_pos)


@needs_compiler
def test_compiled_generation_samples_the_eager_tokens(simba):
    text, mask = random_text([3, 6], seed=4)
    opts = dict(n_frames=16, top_k=50, cfg_scale=3.0, seed=11)
    assert torch.equal(simba.generate(text, mask, compile=True, **opts), simba.generate(text, mask, **opts))


@pytest.mark.parametrize("arch", ["transformer", "hybrid"])
def test_models_with_attention_decode_eagerly_with_a_warning(arch):
    model = tiny_model(arch)
    assert not supports_compiled_step(model)
    text, mask = random_text([4], seed=2)
    opts = dict(n_frames=8, top_k=50, cfg_scale=3.0, seed=5)
    with pytest.warns(UserWarning, match="attention layers"):
        got = model.generate(text, mask, compile=True, **opts)
    assert torch.equal(got, model.generate(text, mask, **opts))
