"""Pretrained parts: tiny random models saved in each library's format, loaded back by the production loaders.

Nothing here may touch the network: caches point at empty temporary folders, the hub is in offline mode,
and any internet socket connection fails the test.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.pretrained.codec import (
    dac_cache_path,
    decode_codebook0,
    encode_codes,
    load_codec,
    n_frames,
)
from modeling.pretrained.errors import MissingWeightsError
from modeling.pretrained.separator import load_separator, remove_vocals
from modeling.pretrained.text_encoder import TextEncoder
from modeling.pretrained.tiny import make_tiny_pretrained
from tests.conftest import go_offline

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),  # audiotools' docstrings
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),  # dac uses the old weight_norm
]

SR = 44100
CAPTIONS = ["A happy rock song with loud electric guitar and drums.", "calm piano", "slow ambient pads, warm bass"]


def sine(seconds: float, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Empty weight caches, hub offline, and no internet connections."""
    go_offline(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return make_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def codec(tiny):
    return load_codec(tiny["codec"])


@pytest.fixture(scope="module")
def text_encoder(tiny):
    return TextEncoder(tiny["text_encoder"])


@pytest.fixture(scope="module")
def separator(tiny):
    return load_separator(tiny["separator"])


def test_make_tiny_pretrained_is_idempotent(tiny):
    stamps = {k: os.stat(p).st_mtime_ns for k, p in tiny.items()}
    again = make_tiny_pretrained(Path(tiny["codec"]).parent)
    assert again == tiny
    assert {k: os.stat(p).st_mtime_ns for k, p in again.items()} == stamps


# --- DAC ---------------------------------------------------------------------------------------------------------


def test_codec_loads_every_saved_weight(tiny, codec):
    saved = torch.load(tiny["codec"], map_location="cpu")["state_dict"]
    loaded = codec.state_dict()
    assert saved.keys() == loaded.keys()  # dac's loader is non-strict: check nothing was silently left random
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0)
    assert (codec.n_codebooks, codec.codebook_size, int(codec.hop_length), codec.sample_rate) == (9, 1024, 512, SR)
    assert not codec.training


def test_encode_codes_shape_dtype_range(codec):
    x = sine(3.0)
    codes = encode_codes(codec, x)
    assert codes.shape == (9, math.ceil(3 * SR / 512)) == (9, n_frames(codec, len(x)))
    assert codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() < 1024
    # A batch encodes each clip on its own.
    batch = encode_codes(codec, torch.from_numpy(np.stack([x, sine(3.0, 220.0)])))
    assert batch.shape == (2, 9, codes.shape[1]) and batch.dtype == np.int16
    np.testing.assert_array_equal(batch[0], codes)


def test_encode_30s_gives_2584_frames(codec):
    assert n_frames(codec, 30 * SR) == 2584
    assert encode_codes(codec, sine(30.0)).shape == (9, 2584)


def test_decode_codebook0(codec):
    x = sine(2.0)
    codes = encode_codes(codec, x)
    audio = decode_codebook0(codec, codes)
    assert audio.dtype == np.float32 and audio.shape == (codes.shape[1] * 512,)
    assert 0 <= len(audio) - len(x) < 512 and np.isfinite(audio).all()
    # Only codebook 0 matters: the (frames,) tokens and a batch decode to the same audio.
    np.testing.assert_array_equal(decode_codebook0(codec, codes[0]), audio)
    batched = decode_codebook0(codec, np.stack([codes, codes]))
    assert batched.shape == (2, len(audio))
    np.testing.assert_allclose(batched[0], audio, atol=1e-5)


def test_codec_default_id_resolves_from_dac_cache_only(tiny):
    cached = dac_cache_path("44khz")
    assert cached == Path(os.environ["HOME"]) / ".cache/descript/dac/weights_44khz_8kbps_0.0.1.pth"
    with pytest.raises(MissingWeightsError, match="preprocess.codec"):
        load_codec()
    cached.parent.mkdir(parents=True)
    shutil.copy(tiny["codec"], cached)
    assert load_codec().n_codebooks == 9


# --- Flan-T5 -----------------------------------------------------------------------------------------------------


def test_text_encoder_batch(text_encoder):
    emb, lengths = text_encoder(CAPTIONS)
    counts = [len(text_encoder.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert text_encoder.dim == 32
    assert emb.dtype == np.float16 and emb.shape == (3, max(counts), 32)
    assert lengths.dtype == np.int32 and lengths.tolist() == counts
    assert text_encoder.tokenizer(CAPTIONS[1])["input_ids"][-1] == text_encoder.tokenizer.eos_token_id
    for row, n in zip(emb, lengths, strict=True):
        assert not row[n:].any() and np.abs(row[:n]).sum(-1).min() > 0
    # A caption's embeddings do not depend on what else is in the batch.
    for i, caption in enumerate(CAPTIONS):
        alone, n = text_encoder([caption])
        assert n[0] == lengths[i]
        diff = np.abs(alone[0].astype(np.float32) - emb[i, : n[0]].astype(np.float32)).max()
        print(f"caption {i}: max |alone - batched| = {diff:.2e}")
        assert diff < 2e-3


def test_text_encoder_hub_id_resolves_from_hf_cache_only(tiny):
    with pytest.raises(MissingWeightsError, match="preprocess.text_encoder"):
        TextEncoder()
    # Lay the tiny model out as the hub cache would hold google/flan-t5-base.
    import huggingface_hub.constants

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--google--flan-t5-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny["text_encoder"], repo / "snapshots" / ("0" * 40))
    enc = TextEncoder("google/flan-t5-base")
    assert enc.dim == 32 and enc(["calm piano"])[0].shape[-1] == 32


# --- HTDemucs ----------------------------------------------------------------------------------------------------


def _non_vocals_directly(model, x: np.ndarray) -> np.ndarray:
    """x: (T,) mono, duplicated to both channels, or (T, 2) stereo."""
    from demucs.apply import apply_model

    wav = torch.from_numpy(x)[None].repeat(2, 1) if x.ndim == 1 else torch.from_numpy(x).T.contiguous()
    mean, std = wav.mean(0).mean(), wav.mean(0).std() + 1e-8
    out = apply_model(model, ((wav - mean) / std)[None], split=True, overlap=0.25, progress=False)[0] * std + mean
    keep = [i for i, s in enumerate(model.sources) if s != "vocals"]
    return out[keep].sum(0).mean(0).numpy()


def test_remove_vocals_equals_demucs_non_vocal_sum(separator):
    x = sine(3.0) + 0.1 * np.random.default_rng(0).standard_normal(3 * SR).astype(np.float32)
    random.seed(0)  # apply_model's default single random shift
    y = remove_vocals(separator, x)
    random.seed(0)
    ref = _non_vocals_directly(separator, x)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, atol=1e-6)
    # shifts=0 is deterministic.
    np.testing.assert_array_equal(remove_vocals(separator, x, shifts=0), remove_vocals(separator, x, shifts=0))
    with pytest.raises(ValueError, match="resample"):
        remove_vocals(separator, x, sample_rate=16000)


def test_remove_vocals_separates_stereo_as_it_is(separator):
    """(T, 2) goes to HTDemucs channel for channel (demucs' own normalisation); the result is mono (T,). (T, 1)
    is the same as (T,): dual mono."""
    x = np.stack([sine(2.0), 0.5 * sine(2.0, freq=660.0)], 1)  # different content per channel
    random.seed(0)  # apply_model's default single random shift
    y = remove_vocals(separator, x)
    random.seed(0)
    assert y.shape == (len(x),) and y.dtype == np.float32
    np.testing.assert_allclose(y, _non_vocals_directly(separator, x), atol=1e-6)
    y = remove_vocals(separator, x, shifts=0)
    assert not np.allclose(y, remove_vocals(separator, x.mean(1), shifts=0), atol=1e-4)  # not a downmix first
    np.testing.assert_array_equal(
        remove_vocals(separator, x[:, :1], shifts=0), remove_vocals(separator, x[:, 0], shifts=0)
    )
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        remove_vocals(separator, np.zeros((SR, 3), np.float32))


def test_separator_local_repo_and_torch_hub_cache(tiny):
    # A directory holding a bag of models (yaml) next to its .th, as demucs' --repo expects.
    repo = Path(os.environ["HOME"]) / "repo"
    repo.mkdir(parents=True)
    shutil.copy(tiny["separator"], repo / "abcd1234.th")
    (repo / "tinybag.yaml").write_text("models: ['abcd1234']\n")
    bag = load_separator(repo)
    assert type(bag).__name__ == "BagOfModels" and bag.sources == ["drums", "bass", "other", "vocals"]
    assert remove_vocals(bag, sine(1.0), shifts=0).shape == (SR,)
    assert type(load_separator(repo / "tinybag.yaml")).__name__ == "BagOfModels"
    # The default name resolves from the torch hub cache, where demucs' legacy loader looks, without downloading.
    with pytest.raises(MissingWeightsError, match="preprocess.separator"):
        load_separator()
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(tiny["separator"], checkpoints / "955717e8-8726e21a.th")
    assert load_separator().sources == ["drums", "bass", "other", "vocals"]


# --- missing weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load, setting",
    [
        (lambda p: load_codec(p, setting="preprocess.codec"), "preprocess.codec"),
        (lambda p: TextEncoder(p), "preprocess.text_encoder"),
        (lambda p: load_separator(p), "preprocess.separator"),
    ],
    ids=["codec", "text_encoder", "separator"],
)
def test_missing_local_path_names_the_setting(tmp_path, load, setting):
    missing = tmp_path / "nowhere" / "weights.th"
    with pytest.raises(MissingWeightsError, match=setting) as err:
        load(str(missing))
    assert isinstance(err.value, FileNotFoundError) and str(missing) in str(err.value)


def test_missing_hub_weights_name_the_setting():
    for load, setting in [
        (lambda: load_codec("44khz"), "preprocess.codec"),
        (lambda: TextEncoder("google/flan-t5-base"), "preprocess.text_encoder"),
        (lambda: load_separator("htdemucs"), "preprocess.separator"),
        (lambda: load_separator("hf://htdemucs_ft"), "preprocess.separator"),
    ]:
        with pytest.raises(MissingWeightsError, match=setting):
            load()
