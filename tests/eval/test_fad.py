"""FAD: the Fréchet distance against independent computations, and the VGGish / CLAP embedders behind it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.fad import Vggish, fad, fad_embedder, frechet_distance, vggish_cache_path
from modeling.pretrained.errors import MissingWeightsError

SR = 44100


def correlated(n: int, dim: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """n samples of a Gaussian with a random full covariance and mean."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) * scale
    return rng.standard_normal((n, dim)) @ mix + rng.standard_normal(dim)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fd_by_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """The symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by eigendecompositions (no product eigvals)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = sqrtm_psd(s1)
    cross = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def test_frechet_distance_matches_an_eigendecomposition():
    x, y = correlated(400, 8, seed=0), correlated(300, 8, seed=1, scale=0.7)
    got, want = frechet_distance(x, y), fd_by_eigh(x, y)
    print(f"FD {got:.10f} vs eigh {want:.10f}")
    assert got == pytest.approx(want, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(want, rel=1e-9)  # symmetric
    assert frechet_distance(torch.from_numpy(x).float(), y) == pytest.approx(want, rel=1e-5)  # any input dtype


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    # Sets whose sample covariances are exactly diagonal: centred orthonormal columns, scaled per dimension.
    n, dim = 50, 6
    rng = np.random.default_rng(2)

    def diagonal_set(stds, mean):
        a = rng.standard_normal((n, dim))
        q, _ = np.linalg.qr(a - a.mean(0))  # (n, dim) orthonormal columns, each orthogonal to the ones vector
        return q * np.asarray(stds) * np.sqrt(n - 1) + mean  # covariance = diag(stds^2), mean = mean

    s1, s2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    m1, m2 = rng.standard_normal(dim), rng.standard_normal(dim)
    x, y = diagonal_set(s1, m1), diagonal_set(s2, m2)
    np.testing.assert_allclose(np.cov(x, rowvar=False), np.diag(s1**2), atol=1e-12)
    # For diagonal covariances: |m1 - m2|^2 + sum_i (s1_i - s2_i)^2
    want = ((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = correlated(300, 16, seed=3)
    assert abs(frechet_distance(x, x)) < 1e-8


def test_shifting_one_set_adds_the_squared_shift():
    x = correlated(300, 8, seed=4)
    d = np.random.default_rng(5).standard_normal(8)
    assert frechet_distance(x, x + d) == pytest.approx((d**2).sum(), rel=1e-8)
    # and on top of an existing distance, when the covariances are equal (y is x shifted)
    y = x + 1.5
    base = frechet_distance(x, y)
    assert frechet_distance(x, y + d) == pytest.approx(((1.5 + d) ** 2).sum(), rel=1e-8)
    assert base == pytest.approx(8 * 1.5**2, rel=1e-8)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --- VGGish ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory) -> Path:
    """A random full-size VGGish saved as torchvggish's release is (a plain state dict); it has no small variant."""
    from torchvggish.torchvggish import VGG, make_layers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vggish") / "vggish.pth"
    torch.save(VGG(make_layers(), postprocess=False).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vggish(vggish_file) -> Vggish:
    return Vggish(vggish_file)


def test_vggish_loads_every_weight_and_drops_the_final_relu(vggish, vggish_file):
    saved = torch.load(vggish_file, weights_only=True)
    loaded = vggish.model.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert isinstance(vggish.model.embeddings[-1], torch.nn.Linear)  # 128-d, pre-ReLU (Google's fc2 is linear)
    assert not vggish.model.postprocess


def test_vggish_embeds_every_half_second(vggish):
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.standard_normal((1, 10 * SR))).astype(np.float32)
    emb = vggish.embed(clips, SR)
    # 10 s at 16 kHz: 998 log-mel frames of 10 ms; 96-frame examples every 50 frames -> 19.
    assert emb.shape == (19, 128) and emb.dtype == torch.float32
    assert (emb < 0).any()  # no final ReLU
    # Example k starts 0.5 s after example k - 1: overlapping examples share their log-mel frames.
    ex = vggish.examples(clips[0, : 2 * 16000].astype(np.float64))  # (any 16 kHz signal will do)
    assert ex.shape == (3, 96, 64)
    np.testing.assert_array_equal(ex[1, :46], ex[0, 50:])
    # A clip shorter than one example gives no frame rather than a padded one.
    assert vggish.embed(np.zeros((1, SR // 2), np.float32), SR).shape == (0, 128)


def test_vggish_embedding_ignores_the_level_and_the_batch(vggish):
    x = (0.1 * np.random.default_rng(1).standard_normal((3, 2 * SR))).astype(np.float32)
    together = vggish.embed(x, SR)
    alone = vggish.embed(x[1:2], SR)
    quieter = vggish.embed(0.25 * x[1:2], SR)  # peak-normalised first, as audiocraft writes its FAD files
    per_clip = len(together) // 3
    torch.testing.assert_close(alone, together[per_clip : 2 * per_clip], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(quieter, alone, atol=1e-5, rtol=1e-4)


def test_vggish_default_id_resolves_from_the_torch_hub_cache_only(vggish_file):
    cached = vggish_cache_path("vggish")
    assert cached == Path(torch.hub.get_dir()) / "checkpoints" / "vggish-10086976.pth"
    with pytest.raises(MissingWeightsError, match="eval.vggish") as err:
        Vggish()
    assert str(cached) in str(err.value)
    cached.parent.mkdir(parents=True)
    os.symlink(vggish_file, cached)  # where torchvggish's own download would have put it
    assert isinstance(Vggish().model.embeddings[-1], torch.nn.Linear)


def test_missing_vggish_file_names_the_setting(tmp_path):
    with pytest.raises(MissingWeightsError, match="eval.vggish") as err:
        Vggish(tmp_path / "nowhere.pth")
    assert str(tmp_path / "nowhere.pth") in str(err.value)


# --- FAD end to end ----------------------------------------------------------------------------------------------


def test_fad_with_vggish_is_the_distance_of_its_embeddings(vggish):
    rng = np.random.default_rng(2)
    gen = (0.1 * rng.standard_normal((2, 2 * SR))).astype(np.float32)
    ref = np.stack([np.sin(2 * np.pi * f * np.arange(2 * SR) / SR) for f in (220.0, 330.0)]).astype(np.float32)
    got = fad(fad_embedder("vggish", vggish=vggish, batch_size=2), gen, ref, SR)
    want = frechet_distance(vggish.embed(gen, SR), vggish.embed(ref, SR))  # 2 clips x 3 examples each
    assert got == pytest.approx(want, rel=1e-9) and want > 0


def test_fad_with_clap_embeddings(tiny_eval):
    from eval.clap import Clap

    clap = Clap(tiny_eval["clap"])
    rng = np.random.default_rng(3)
    gen = (0.1 * rng.standard_normal((2, SR))).astype(np.float32)
    ref = np.stack([np.sin(2 * np.pi * f * np.arange(SR) / SR) for f in (220.0, 880.0)]).astype(np.float32)
    got = fad(fad_embedder("clap", clap=clap), gen, ref, SR)
    emb_gen, emb_ref = clap.embed_audio(gen, SR), clap.embed_audio(ref, SR)
    assert emb_gen.shape == (2, clap.dim)  # one row per clip
    assert got == pytest.approx(frechet_distance(emb_gen, emb_ref), rel=1e-9) and got > 0
    with pytest.raises(ValueError, match="no VGGish model"):
        fad_embedder("vggish", clap=clap)
    with pytest.raises(ValueError, match="'vggish' or 'clap'"):
        fad_embedder("pann", clap=clap)
