"""The compiled decoding step (modeling/compiled.py) against the eager step and the full forward, under each
weight-product strategy, the automatic choice between them, and the eager fallback for attention.

One tiny SiMBA is compiled once per strategy for the module (4 rows: 2 captions + their unconditional twins,
as CFG generation runs them); compiling costs tens of seconds on 2 cores. Speed is never asserted here: which
strategy wins is the machine's business (bench/generate.py prints it).
"""

from __future__ import annotations

import pytest
import torch

from modeling.compiled import (
    CHOICE_CACHE_ENV,
    COMPILATIONS,
    SMALL_ROWS,
    STRATEGIES,
    STRATEGY_ENV,
    CompiledStep,
    StrategyChoice,
    _mm,
    _read_choices,
    _remember_choice,
    _rows_times,
    choice_cache_file,
    compiled_step,
    cpu_compile_problem,
    supports_compiled_step,
)
from modeling.fused import MAX_ROWS, FusedStepError
from modeling.fused import build_problem as fused_build_problem
from modeling.layers import state_tensors
from modeling.lm import with_null_condition
from modeling.pages import huge_page_problem, huge_pages_off
from tests.conftest import random_text, tiny_model

VOCAB = 1025
T = 12
needs_compiler = pytest.mark.skipif(cpu_compile_problem() is not None, reason=str(cpu_compile_problem()))


@pytest.fixture(scope="module")
def simba():
    return tiny_model("simba", seed=3)


@pytest.fixture(scope="module")
def batch():
    """Text of 2 captions of different lengths + their null twins (4 rows), and teacher-forcing tokens."""
    text, mask = with_null_condition(*random_text([3, 6], seed=4))  # (4, S, C)
    tokens = torch.randint(0, VOCAB - 1, (4, T), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = VOCAB - 1
    return tokens, text, mask


def test_rows_times_is_a_matrix_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 17, generator=g, dtype=torch.float64), torch.randn(17, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(_rows_times(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert _mm(torch.randn(9, 4), torch.randn(4, 2)) is NotImplemented  # more rows than SMALL_ROWS: gemm


@needs_compiler
@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
@torch.no_grad()
def test_compiled_step_equals_eager_step(simba, batch, strategy):
    """Teacher-forced: the same tokens through both steps give the same logits and SSM states."""
    tokens, text, mask = batch
    _, eager_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    _, fast_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    step = compiled_step(simba, strategy)
    worst = 0.0
    for t in range(1, T):
        eager = simba.step(tokens[:, t], eager_state)
        fast = step(tokens[:, t], fast_state)
        worst = max(worst, (eager - fast).abs().max().item())
    used = step.choice(4).strategy
    print(f"{strategy} ({used}): max |compiled - eager| logits over {T - 1} steps: {worst:.2e}")
    assert COMPILATIONS[used] > 0  # it really ran compiled code (dynamo falls back to eager silently)
    assert worst < 1e-4
    for a, b in zip(eager_state.layers, fast_state.layers, strict=True):
        assert torch.allclose(a.mixer.ssm_state, b.mixer.ssm_state, atol=1e-5)
        assert torch.allclose(a.mixer.conv_state, b.mixer.conv_state, atol=1e-6)
    assert torch.equal(eager_state.next_pos, fast_state.next_pos)


@needs_compiler
@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_compiled_steps_reproduce_the_full_forward(simba, batch, strategy):
    """Prefill [BOS], then compiled teacher-forced steps give every position's logits of one full forward."""
    tokens, text, mask = batch
    full = simba(tokens, text, mask).logits  # (4, T, V)
    logits, state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    step = compiled_step(simba, strategy)
    got = torch.stack([logits] + [step(tokens[:, t], state) for t in range(1, T)], dim=1)
    worst = (got - full).abs().max().item()
    print(f"{strategy}: max |compiled steps - full forward| {worst:.2e}")
    assert step.choice(4).strategy == strategy
    assert worst < 1e-4


@needs_compiler
@torch.no_grad()
def test_auto_times_both_strategies_once_and_keeps_the_faster(simba, batch):
    tokens, text, mask = batch
    _, state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
    before = state.next_pos.clone()
    step = compiled_step(simba, "auto")
    step(tokens[:, 1], state)
    choice = step.choice(4)
    assert choice.reason == "timed" and set(choice.ms_per_step) == set(step._candidates(4))
    assert set(step._candidates(4)) == set(STRATEGIES) or fused_build_problem()  # fused: wherever it builds
    assert choice.strategy == min(choice.ms_per_step, key=choice.ms_per_step.get)
    assert torch.equal(state.next_pos, before + 1)  # the timing ran on copies: the caller's state moved once
    # Cached with the model: a new wrapper (what every `generate(compile=True)` builds) does not time again.
    again = compiled_step(simba, "auto")
    again(tokens[:, 2], state)
    assert again.choice(4) is choice
    # And in the cache file: another process, or another model of the same shapes, takes the choice from there.
    twin = tiny_model("simba", seed=5)
    _, twin_state = twin.prefill(tokens[:, :1], text, mask, max_len=T)
    other = compiled_step(twin, "auto")
    other(tokens[:, 1], twin_state)
    kept = other.choice(4)
    assert kept.reason == f"timed earlier on this machine ({choice_cache_file()})"
    assert (kept.strategy, kept.ms_per_step) == (choice.strategy, choice.ms_per_step)
    # A choice timed on huge pages does not hold for 4 KiB pages (where the machine has huge pages at all).
    with huge_pages_off():
        small_pages = compiled_step(twin, "auto")
        small_pages(tokens[:, 2], twin_state)
    assert small_pages.choice(4).reason == ("timed" if huge_page_problem() is None else kept.reason)


def test_the_choice_cache_file_is_configurable_and_survives_a_broken_file(simba, tmp_path, monkeypatch):
    monkeypatch.setenv(CHOICE_CACHE_ENV, "off")
    assert choice_cache_file() is None
    monkeypatch.setenv(CHOICE_CACHE_ENV, str(tmp_path / "choices.json"))
    assert choice_cache_file() == tmp_path / "choices.json"
    monkeypatch.delenv(CHOICE_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert choice_cache_file() == tmp_path / "xdg" / "simba-ttm" / "decode_strategy.json"

    file = tmp_path / "choices.json"
    file.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the compiled-step strategy cache"):
        assert _read_choices(file) == {}
        _remember_choice(file, "k", StrategyChoice("gemm", "timed", {"gemm": 1.0, "reduce": 2.0}))  # replaces it
    assert _read_choices(file) == {"k": {"strategy": "gemm", "ms_per_step": {"gemm": 1.0, "reduce": 2.0}}}
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["choices.json"]

    # A path that cannot become the file (here a folder): a warning, and no temporary file left behind.
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.warns(UserWarning) as caught:  # it cannot be read either: "ignoring ..." comes first
        _remember_choice(folder, "k", StrategyChoice("gemm", "timed", {"gemm": 1.0, "reduce": 2.0}))
    assert "cannot keep the compiled-step strategy" in str(caught[-1].message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "choices.json"]


def test_more_rows_narrow_the_strategies_timed(simba):
    step = CompiledStep(simba, "auto")
    # Above SMALL_ROWS reduce's products are gemm's: gemm and (where it builds) fused are timed.
    assert step._candidates(SMALL_ROWS + 2) == ["gemm", *([] if fused_build_problem() else ["fused"])]
    # Above the fused kernel's rows only gemm runs: nothing is compiled or timed to choose (so no state is needed).
    choice = step._choose(torch.zeros(MAX_ROWS + 2, 1, dtype=torch.long), state=None)
    assert choice.strategy == "gemm" and "only strategy" in choice.reason and not choice.ms_per_step


def test_forcing_fused_where_it_cannot_run_says_why(simba):
    # More rows than the fused kernel takes: gemm, and the choice says why.
    choice = CompiledStep(simba, "fused")._forced_choice(torch.zeros(MAX_ROWS + 2, 1, dtype=torch.long))
    assert choice.strategy == "gemm" and f"fused kernel's {MAX_ROWS}" in choice.reason
    bf16 = tiny_model("simba").to(torch.bfloat16)
    with pytest.raises(FusedStepError, match="fp32 weights on the CPU"):
        CompiledStep(bf16, "fused")(torch.zeros(2, 1, dtype=torch.long), bf16.allocate_state(2, 4))


def test_strategy_from_argument_environment_or_auto(simba, monkeypatch):
    monkeypatch.delenv(STRATEGY_ENV, raising=False)
    assert CompiledStep(simba).requested == "auto"
    monkeypatch.setenv(STRATEGY_ENV, "gemm")
    assert CompiledStep(simba).requested == "gemm"
    assert CompiledStep(simba, "reduce").requested == "reduce"  # the argument wins
    monkeypatch.setenv(STRATEGY_ENV, "fastest")
    with pytest.raises(ValueError, match=f"'fastest' \\(from {STRATEGY_ENV}\\); valid: auto, reduce, gemm, fused"):
        compiled_step(simba)
    with pytest.raises(ValueError, match="valid: auto, reduce, gemm, fused"):
        compiled_step(tiny_model("transformer"), "mkl")  # rejected on models that would not compile, too


@needs_compiler
@torch.no_grad()
def test_weights_and_each_new_state_go_onto_huge_pages_and_results_stay(simba, batch, monkeypatch):
    """Prefill pages them once per state (a generation), not per step; the compiled logits equal the eager step's."""
    import modeling.lm
    import modeling.pages

    monkeypatch.setattr(modeling.pages, "MIN_TENSOR_BYTES", 0)  # the tiny model's tensors count too
    reports = []

    def recording(tensors):
        tensors = list(tensors)
        reports.append((len(tensors), modeling.pages.use_huge_pages(tensors)))
        return reports[-1][1]

    monkeypatch.setattr(modeling.lm, "use_huge_pages", recording)
    tokens, text, mask = batch
    step = compiled_step(simba, "reduce")
    n_tensors = len(list(simba.parameters())) + len(state_tensors(simba.allocate_state(4, T)))
    for _ in range(2):  # two generations
        _, eager_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
        _, fast_state = simba.prefill(tokens[:, :1], text, mask, max_len=T)
        for t in range(1, 4):
            assert torch.allclose(step(tokens[:, t], fast_state), simba.step(tokens[:, t], eager_state), atol=1e-4)
    assert [n for n, _ in reports] == [n_tensors] * 4  # one call per prefill, none from the steps
    print(reports[-1][1])
    if huge_page_problem() is None:
        assert reports[-1][1].collapsed > 0, reports[-1][1]
    with huge_pages_off():
        step(tokens[:, 1], simba.prefill(tokens[:, :1], text, mask, max_len=T)[1])
    assert len(reports) == 5 and reports[-1][1].collapsed == 0


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
