"""Generation: incremental decoding equals the full forward, seeds, CFG, sampling filters."""

from __future__ import annotations

import pytest
import torch

from modeling.layers import state_tensors
from modeling.lm import with_null_condition
from modeling.sampling import cfg_combine, filter_logits, sample_next
from tests.conftest import random_text, tiny_model

VOCAB = 1025


def test_incremental_logits_equal_full_forward(arch):
    """Prefill [BOS], then teacher-forced steps reproduce every position of the full forward."""
    model = tiny_model(arch)
    text, mask = random_text([3, 7], seed=5)  # different lengths: padding is exercised too
    T = 21  # longer than chunk_size (8), not a multiple of it
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB - 1, (2, T), generator=g)
    tokens[:, 0] = VOCAB - 1
    full = model(tokens, text, mask).logits  # (B, T, V)
    logits, state = model.prefill(tokens[:, :1], text, mask, max_len=T)
    steps = [logits]
    for t in range(1, T):
        steps.append(model.step(tokens[:, t], state))
    incremental = torch.stack(steps, dim=1)
    diff = (incremental - full).abs().max().item()
    print(f"{arch}: max |incremental - full| = {diff:.2e}")
    assert diff < 1e-4


def test_prefill_of_several_tokens_then_steps(arch):
    model = tiny_model(arch)
    text, mask = random_text([4], seed=6)
    tokens = torch.randint(0, VOCAB - 1, (1, 15))
    tokens[:, 0] = VOCAB - 1
    full = model(tokens, text, mask).logits
    logits, state = model.prefill(tokens[:, :9], text, mask, max_len=15)
    assert torch.allclose(logits, full[:, 8], atol=1e-4)
    for t in range(9, 15):
        assert torch.allclose(model.step(tokens[:, t], state), full[:, t], atol=1e-4)


def _gen(model, text, mask, **kw):
    opts = dict(n_frames=24, top_k=50, temperature=1.0, cfg_scale=3.0, seed=7)
    return model.generate(text, mask, **{**opts, **kw})


def test_generate_shapes_range_and_seed(arch):
    model = tiny_model(arch)
    text, mask = random_text([3, 5])
    a, b = _gen(model, text, mask), _gen(model, text, mask)
    assert a.shape == (2, 24) and a.dtype == torch.long
    assert int(a.max()) < VOCAB - 1 and int(a.min()) >= 0  # never BOS/pad
    assert torch.equal(a, b)
    assert not torch.equal(a, _gen(model, text, mask, seed=8))


def test_cached_generation_equals_recompute(arch):
    """The cache path samples exactly the tokens of the paper code's recompute-everything path."""
    model = tiny_model(arch)
    text, mask = random_text([3, 6], seed=9)
    cached = _gen(model, text, mask)
    recompute = _gen(model, text, mask, use_cache=False)
    assert torch.equal(cached, recompute)


def test_cfg_scale_one_equals_plain_conditional_sampling(arch):
    """cfg_scale 1.0 is conditional sampling: reproduce it with a hand-written loop over the full forward."""
    model = tiny_model(arch)
    text, mask = random_text([4], seed=10)
    got = _gen(model, text, mask, cfg_scale=1.0, n_frames=12)
    g = torch.Generator().manual_seed(7)
    seq = torch.full((1, 1), VOCAB - 1)
    with torch.no_grad():
        for _ in range(12):
            logits = model(seq, text, mask).logits[:, -1].float()
            logits[:, VOCAB - 1] = float("-inf")
            tok = sample_next(logits, temperature=1.0, top_k=50, generator=g)
            seq = torch.cat([seq, tok[:, None]], 1)
    assert torch.equal(got, seq[:, 1:])


def test_cfg_combines_cond_and_null_in_one_batch(arch):
    """Greedy CFG decoding equals argmax of uncond + s (cond - uncond) computed from full forwards."""
    model = tiny_model(arch)
    text, mask = random_text([5], seed=11)
    got = _gen(model, text, mask, temperature=0.0, cfg_scale=2.5, n_frames=8)
    both_text, both_mask = with_null_condition(text, mask)
    seq = torch.full((2, 1), VOCAB - 1)
    with torch.no_grad():
        for _ in range(8):
            logits = model(seq, both_text, both_mask).logits[:, -1]
            guided = logits[1] + 2.5 * (logits[0] - logits[1])
            guided[VOCAB - 1] = float("-inf")
            seq = torch.cat([seq, guided.argmax().repeat(2, 1)], 1)
    assert torch.equal(got[0], seq[0, 1:])


def test_cfg_combine_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.allclose(cfg_combine(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-6)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.6: 0.5 alone is not enough, 0.5 + 0.25 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits)).any()


def test_top_k_one_is_greedy():
    logits = torch.randn(4, VOCAB)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, top_k=1, generator=g), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-39, 1e-12])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """Dividing by 1e-39 overflows float32 logits to inf (NaN probabilities) unless they are shifted first."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1025) * 5
    logits[:, -1] = float("-inf")  # the pad id, as generation masks it
    for top_k, top_p in ((0, 0.0), (50, 0.0), (0, 0.9)):
        got = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        assert torch.equal(got, logits.argmax(-1)), (top_k, top_p)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampling_frequencies_follow_softmax(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, temperature=temperature, generator=g), minlength=4).float()
    expected = (logits[0] / temperature).softmax(-1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.015)


def test_attention_free_step_updates_its_state_in_place():
    """SiMBA's eager step writes its state where prefill put it: the same tensors, at the same addresses, from step
    to step (what a CUDA graph replaying the step needs: it reads and writes fixed addresses), and the position
    still advances."""
    model = tiny_model("simba")
    text, mask = random_text([3, 5])
    tokens = torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(3))
    _, state = model.prefill(tokens[:, :4], text, mask, max_len=9)

    def memory():
        return [(id(t), t.data_ptr()) for t in state_tensors(state)]

    before, positions = memory(), state.next_pos.clone()
    for t in range(4, 9):
        model.step(tokens[:, t], state)
    assert memory() == before
    assert torch.equal(state.next_pos, positions + 5)
