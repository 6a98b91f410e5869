"""Non-finite losses and gradients: the step is skipped on every worker, counted, and leaves no trace."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.train.optim import clip_and_step, lr_factor
from tests.conftest import tiny_model


def _stepped_setup(seed: int = 0):
    model = tiny_model("simba", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, opt, sched


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_finite_gradients_take_the_step():
    model, opt, sched = _stepped_setup()
    before = _snapshot(model)
    norm = clip_and_step(model.parameters(), opt, sched, grad_clip=1.0)
    assert norm is not None and math.isfinite(norm) and norm > 1.0  # pre-clip norm of random gradients
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert sched.last_epoch == 1 and len(opt.state) > 0
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_gradient_norm_skips_the_step():
    """A finite loss can still overflow in backward: weights, AdamW moments and the schedule stay as they were."""
    for bad in (float("inf"), float("nan")):
        model, opt, sched = _stepped_setup()
        next(iter(model.parameters())).grad.view(-1)[0] = bad
        before = _snapshot(model)
        assert clip_and_step(model.parameters(), opt, sched, grad_clip=1.0) is None
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        assert len(opt.state) == 0 and sched.last_epoch == 0
        assert all(p.grad is None for p in model.parameters())  # the next step starts from clean gradients
        # without clipping the norm is still checked
        for p in model.parameters():
            p.grad = torch.full_like(p, bad)
        assert clip_and_step(model.parameters(), opt, sched, grad_clip=0.0) is None
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_skip_is_honoured_even_with_finite_gradients():
    """Another worker's loss was not finite: this worker skips too, so the replicas stay identical."""
    model, opt, sched = _stepped_setup()
    before = _snapshot(model)
    assert clip_and_step(model.parameters(), opt, sched, grad_clip=1.0, skip=True) is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert len(opt.state) == 0 and all(p.grad is None for p in model.parameters())


def test_nan_caption_embedding_gives_a_nan_loss():
    """What the DDP test in test_train.py relies on to put a non-finite loss on one worker."""
    model = tiny_model("simba").eval()
    tokens = torch.randint(0, 1024, (1, 9))
    text = torch.full((1, 3, model.text_dim), float(np.float16("nan")))
    loss = model(tokens[:, :-1], text, torch.ones(1, 3, dtype=torch.bool), targets=tokens[:, 1:]).loss
    assert not torch.isfinite(loss)
