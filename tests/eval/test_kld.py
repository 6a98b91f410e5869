"""KLD: the formula and its direction, and PaSST loaded through the production loader (tiny and full size)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.kld import EPS, N_LABELS, Passt, kl_divergence, kld, passt_cache_path, passt_kld
from modeling.pretrained.errors import MissingWeightsError

PASST_SR = 32_000


def random_distributions(n: int, k: int, seed: int, zeros: bool = False) -> torch.Tensor:
    p = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(k, 0.5), size=n))
    if zeros:  # some labels with exactly zero probability
        p[:, ::3] = 0
        p = p / p.sum(-1, keepdim=True)
    return p


def kl_written_out(p: np.ndarray, q: np.ndarray, eps: float) -> float:
    total = 0.0
    for pk, qk in zip(p, q, strict=True):
        if pk > 0:  # 0 log 0 = 0
            total += pk * (math.log(pk) - math.log(qk + eps))
    return total


@pytest.mark.parametrize("zeros", [False, True])
def test_kl_divergence_is_the_formula(zeros):
    p, q = random_distributions(4, 7, seed=0, zeros=zeros), random_distributions(4, 7, seed=1)
    assert torch.equal(kl_divergence(p, q), kl_divergence(p, q, eps=EPS))  # audiocraft's epsilon by default
    for eps in (EPS, 0.0):
        want = [kl_written_out(p[i].numpy(), q[i].numpy(), eps) for i in range(4)]
        np.testing.assert_allclose(kl_divergence(p, q, eps=eps).numpy(), want, rtol=1e-12)


def test_kl_of_a_distribution_with_itself_is_zero():
    p = random_distributions(5, N_LABELS, seed=2, zeros=True)
    assert kl_divergence(p, p, eps=0.0).abs().max() < 1e-12
    # audiocraft's epsilon (inside the log of the second argument only) biases it by less than n_labels * eps.
    with_eps = kl_divergence(p, p)
    assert (with_eps <= 0).all() and (with_eps > -N_LABELS * EPS).all()
    result = kld(p, p)
    assert abs(result.kld) < N_LABELS * EPS and abs(result.kld_reverse) < N_LABELS * EPS


def test_kld_direction_is_reference_given_generated():
    ref = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    gen = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    ref_given_gen = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(ref || gen) = 0.368
    gen_given_ref = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(gen || ref) = 0.511
    result = kld(ref, gen)
    assert result.kld == pytest.approx(ref_given_gen, abs=1e-5)
    assert result.kld_reverse == pytest.approx(gen_given_ref, abs=1e-5)
    assert abs(ref_given_gen - gen_given_ref) > 0.1  # the two directions are told apart


def test_kld_averages_over_pairs():
    ref, gen = random_distributions(6, 5, seed=3), random_distributions(6, 5, seed=4)
    result = kld(ref.reshape(3, 2, 5), gen.reshape(3, 2, 5))  # (clips, segments, labels): 6 pairs
    forward = [kl_written_out(r, g, EPS) for r, g in zip(ref.numpy(), gen.numpy(), strict=True)]
    assert result.kld == pytest.approx(np.mean(forward), rel=1e-12)
    assert result.per_pair.shape == (6,) and result.per_pair_reverse.shape == (6,)
    with pytest.raises(ValueError, match="one to one"):
        kld(ref, gen[:5])


# --- PaSST -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passt(tiny_eval) -> Passt:
    return Passt(tiny_eval["passt"])


def test_tiny_passt_loads_every_weight_silently(tiny_eval, capsys):
    capsys.readouterr()
    model = Passt(tiny_eval["passt"])
    saved = torch.load(tiny_eval["passt"], weights_only=True)
    loaded = model.model.net.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert model.model.mode == "logits" and not model.model.training
    probs = model.label_probs(np.zeros((1, PASST_SR), np.float32), PASST_SR)
    assert probs.shape == (1, 1, N_LABELS)
    assert capsys.readouterr().out == ""  # hear21passt's prints are swallowed


def test_label_probs_per_10s_segment(passt):
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((2, int(20.1 * PASST_SR)))).astype(np.float32)  # 10 s + 10 s + a 0.1 s tail
    probs = passt.label_probs(x, PASST_SR)
    assert probs.shape == (2, 2, N_LABELS)  # the 0.1 s tail (<= 0.15 s) is dropped
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2))
    # Segment 1 is the second 10 s on its own, and a clip's result does not depend on its batch neighbours.
    second = passt.label_probs(x[1:, 10 * PASST_SR : 20 * PASST_SR], PASST_SR)
    torch.testing.assert_close(second[0, 0], probs[1, 1], atol=1e-6, rtol=1e-5)
    # A 0.2 s tail is kept as a segment of its own.
    assert passt.label_probs(x[:1, : int(10.2 * PASST_SR)], PASST_SR).shape == (1, 2, N_LABELS)
    with pytest.raises(ValueError, match="too short for PaSST"):
        passt.label_probs(x[:1, : PASST_SR // 10], PASST_SR)


def test_passt_kld_pairs_generated_with_references(passt):
    rng = np.random.default_rng(1)
    sr = 44100
    ref = (0.1 * rng.standard_normal((2, 2 * sr))).astype(np.float32)
    gen = np.stack([np.sin(2 * np.pi * f * np.arange(2 * sr) / sr) for f in (440.0, 3000.0)]).astype(np.float32)
    result = passt_kld(passt, gen, ref, sr, batch_size=1)
    want = kld(passt.label_probs(ref, sr), passt.label_probs(gen, sr))
    # batch_size=1 against whole batches: float32 matmuls may round differently
    assert result.kld == pytest.approx(want.kld, rel=1e-4) and result.kld_reverse == pytest.approx(
        want.kld_reverse, rel=1e-4
    )
    assert result.per_pair.shape == (2,)


@pytest.mark.slow  # ~4 s unloaded: two full-size builds and a 345 MB state dict through the disk
def test_full_size_passt_loads_through_the_library_builder(tmp_path):
    """PaSST-S itself (86M parameters) builds offline with pretrained=False, and its state dict loads back."""
    from hear21passt.models.passt import get_model

    from eval.kld import _quiet

    with _quiet():
        torch.manual_seed(0)
        net = get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False)
    path = tmp_path / "passt-s.pt"
    torch.save(net.state_dict(), path)
    model = Passt(path)
    loaded = model.model.net
    assert type(loaded) is type(net) and sum(p.numel() for p in loaded.parameters()) == 86_153_758
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert len(loaded.blocks) == 12 and loaded.blocks[0].attn.num_heads == 12


def test_passt_default_id_resolves_from_the_torch_hub_cache_only(tiny_eval):
    cached = passt_cache_path("passt_s_swa_p16_128_ap476")
    assert cached == Path(torch.hub.get_dir()) / "checkpoints" / "passt-s-f128-p16-s10-ap.476-swa.pt"
    with pytest.raises(MissingWeightsError, match="eval.passt") as err:
        Passt()
    assert str(cached) in str(err.value)
    cached.parent.mkdir(parents=True)
    os.symlink(tiny_eval["passt"], cached)  # where hear21passt's own download would have put it
    assert Passt().label_probs(np.zeros((1, PASST_SR), np.float32), PASST_SR).shape == (1, 1, N_LABELS)


def test_missing_passt_file_names_the_setting(tmp_path):
    with pytest.raises(MissingWeightsError, match="eval.passt") as err:
        Passt(tmp_path / "nowhere.pt", setting="eval.passt")
    assert str(tmp_path / "nowhere.pt") in str(err.value)
