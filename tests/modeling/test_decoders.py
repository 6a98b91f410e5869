"""Prefix SiMBA and Cross Transformer: sizes, loss, padding invariance, causality, CFG training, dropout."""

from __future__ import annotations

import math

import pytest
import torch

from configs import load_config
from modeling.builders import build_model
from modeling.layers import SelfAttention
from modeling.lm import with_null_condition
from modeling.simba import MambaMixer
from modeling.summary import count_params
from tests.conftest import random_text, tiny_model

VOCAB = 1025


def _tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB - 1, (B, T), generator=g)
    tokens[:, 0] = VOCAB - 1  # BOS
    return tokens


@pytest.mark.parametrize(("arch", "expected"), [("simba", 281e6), ("transformer", 305e6)])
def test_paper_parameter_counts_on_meta_device(arch, expected):
    cfg = load_config("configs/paper.yaml", [f"model.arch={arch}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    params, _ = count_params(model)
    print(f"{arch}: {params:,} parameters")
    assert abs(params - expected) / expected < 0.02
    assert all(p.device.type == "meta" for p in model.parameters())


def test_hybrid_layers_are_injected():
    model = tiny_model("hybrid")
    assert isinstance(model.layers[0].mixer, MambaMixer)
    assert isinstance(model.layers[1].mixer, SelfAttention)
    # mamba_ssm parameter names survive the subclassing, so checkpoints load on the CUDA path too.
    names = {n for n, _ in model.layers[0].mixer.named_parameters()}
    assert {"in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"} <= names


def test_loss_at_init_is_near_uniform(arch):
    model = tiny_model(arch)
    text, mask = random_text([5, 3])
    tokens = _tokens(2, 24)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = VOCAB - 1  # padding: ignored
    out = model(tokens, text, mask, targets=targets)
    assert out.logits.shape == (2, 24, VOCAB)
    assert abs(out.loss.item() - math.log(VOCAB)) < 0.3


def test_loss_ignores_padding(arch):
    model = tiny_model(arch)
    text, mask = random_text([4])
    tokens = _tokens(1, 16)
    targets = torch.randint(0, VOCAB - 1, (1, 16), generator=torch.Generator().manual_seed(2))
    full = model(tokens, text, mask, targets=targets).loss
    padded_targets = targets.clone()
    padded_targets[:, 8:] = VOCAB - 1
    half = model(tokens, text, mask, targets=padded_targets).loss
    expected = torch.nn.functional.cross_entropy(model(tokens, text, mask).logits[0, :8], targets[0, :8])
    assert torch.allclose(half, expected, atol=1e-6)
    assert not torch.allclose(full, half)


def test_logits_do_not_depend_on_batch_neighbours(arch):
    """Padding a short caption to a longer neighbour's length must not change its logits."""
    model = tiny_model(arch)
    text, mask = random_text([3, 9], seed=3)
    tokens = _tokens(2, 20)
    batched = model(tokens, text, mask).logits
    alone = model(tokens[:1], text[:1, :3], mask[:1, :3]).logits
    diff = (batched[0] - alone[0]).abs().max().item()
    print(f"{arch}: max |batched - alone| = {diff:.2e}")
    assert diff < 1e-5
    # and the caption matters at all (otherwise the check above would be vacuous)
    other = model(tokens[:1], text[1:, :3], mask[1:, :3]).logits
    assert (other[0] - alone[0]).abs().max() > 1e-3


def test_gradient_causality(arch):
    """d logits[t] / d embedding[t'] == 0 for every t' > t."""
    model = tiny_model(arch)
    captured = []
    hook = model.token_emb.register_forward_hook(lambda m, i, o: captured.append(o) or o)
    text, mask = random_text([4, 2])
    T = 12
    logits = model(_tokens(2, T), text, mask).logits
    hook.remove()
    emb = captured[0]
    for t in (0, 5, T - 2):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), emb, retain_graph=True)
        assert grad[:, t + 1 :].abs().max() == 0
        assert grad[:, : t + 1].abs().max() > 0


def test_condition_dropout_uses_the_generation_null(arch):
    """Training with cond_dropout=1 feeds exactly the null condition that CFG uses at generation."""
    model = tiny_model(arch)
    model.cond_dropout = 1.0  # the config caps it below 1; the module takes any probability
    text, mask = random_text([5, 2])
    tokens = _tokens(2, 10)
    model.train()  # dropout is 0 in the tiny config, so only condition dropout acts
    dropped = model(tokens, text, mask).logits
    model.eval()
    null_text, null_mask = with_null_condition(text, mask)
    null = model(tokens, null_text[2:], null_mask[2:]).logits
    conditioned = model(tokens, text, mask).logits
    assert torch.allclose(dropped, null, atol=1e-6)
    assert not torch.allclose(dropped, conditioned, atol=1e-3)


def test_dropout_active_in_training_only(arch):
    model = tiny_model(arch, dropout=0.5, cond_dropout=0.0)
    text, mask = random_text([4])
    tokens = _tokens(1, 10)
    model.eval()
    a, b = model(tokens, text, mask).logits, model(tokens, text, mask).logits
    assert torch.equal(a, b)
    model.train()
    assert not torch.allclose(model(tokens, text, mask).logits, model(tokens, text, mask).logits)


def test_no_weight_decay_groups():
    model = tiny_model("hybrid")
    names = model.no_weight_decay_names()
    for must in (
        "layers.0.mixer.A_log",
        "layers.0.mixer.D",
        "layers.0.mixer.dt_bias",
        "token_emb.weight",
        "layers.0.norm1.weight",
        "layers.0.mlp.fc1.bias",
        "text_proj.1.weight",
        "norm_f.weight",
    ):
        assert must in names, must
    for must_not in ("layers.0.mixer.in_proj.weight", "layers.1.mixer.qkv.weight", "head.weight"):
        assert must_not not in names, must_not
    groups = model.param_groups(0.02)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_tiny_model_overfits_one_batch(arch):
    model = tiny_model(arch)
    model.train()
    text, mask = random_text([4, 6])
    seq = _tokens(2, 33)
    tokens, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(tokens, text, mask, targets=targets).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{arch}: loss {first:.3f} -> {loss.item():.3f}")
    assert loss.item() < 0.3 * first
