"""CLAP score: cosines of embeddings computed on their own, batch independence, 77-token captions, the loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.audio import resample
from eval.clap import TEXT_MAX_LENGTH, Clap, clap_score, cosines
from modeling.pretrained.errors import MissingWeightsError

SR = 44100
CAPTIONS = ["A calm piano piece with soft strings.", "energetic rock with electric guitar and drums", "ambient pads"]


@pytest.fixture(scope="module")
def clap(tiny_eval) -> Clap:
    return Clap(tiny_eval["clap"])


def clips(n: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """n sines of random pitch in a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tones = [np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t)) for _ in range(n)]
    return np.stack(tones).astype(np.float32)


def test_tiny_clap_loads_every_weight(clap, tiny_eval):
    from safetensors.torch import load_file

    saved = load_file(str(Path(tiny_eval["clap"]) / "model.safetensors"))
    loaded = clap.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert (clap.sample_rate, clap.window_seconds, clap.dim) == (48_000, 10.0, 16)
    assert not clap.model.training
    assert len(clap.processor.tokenizer) > 100  # the saved word-level vocabulary, not a special-token fallback


def audio_embedding_by_hand(clap: Clap, clip: np.ndarray) -> np.ndarray:
    """One clip through the steps written out: 48 kHz, repeat-pad to 10 s, log-mel, HTSAT, projection, unit norm."""
    x = resample(torch.from_numpy(clip)[None], SR, 48_000)[0].numpy()
    repeats = 480_000 // len(x)
    x = np.pad(np.tile(x, repeats), (0, 480_000 - repeats * len(x)))  # "repeatpad"
    fe = clap.processor.feature_extractor
    mel = fe._np_extract_fbank_features(x.astype(np.float64), fe.mel_filters_slaney)  # (1001, 64), LAION's non-fusion
    with torch.inference_mode():
        out = clap.model.audio_model(input_features=torch.from_numpy(mel).float()[None, None])
        emb = clap.model.audio_projection(out.pooler_output)
    return (emb / emb.norm(dim=-1, keepdim=True))[0].numpy()


def text_embedding_by_hand(clap: Clap, caption: str) -> np.ndarray:
    tok = clap.processor.tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert tok["input_ids"].shape == (1, 77)
    with torch.inference_mode():
        out = clap.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        emb = clap.model.text_projection(out.pooler_output)
    return (emb / emb.norm(dim=-1, keepdim=True))[0].numpy()


def test_clap_score_is_the_cosine_of_separately_computed_embeddings(clap):
    audio = clips(3, seconds=1.5)
    result = clap_score(clap, audio, SR, CAPTIONS, batch_size=2)
    want = []
    for clip, caption in zip(audio, CAPTIONS, strict=True):
        a, t = audio_embedding_by_hand(clap, clip), text_embedding_by_hand(clap, caption)
        want.append(float(a @ t / (np.linalg.norm(a) * np.linalg.norm(t))))
    print("cosines", result.cosines, "by hand", want)
    np.testing.assert_allclose(result.cosines, want, atol=1e-5)
    assert result.score == pytest.approx(np.mean(want), abs=1e-5)
    assert result.cosines.shape == (3,) and np.ptp(result.cosines) > 0  # distinct pairs, distinct cosines


def test_a_clips_embedding_does_not_depend_on_its_batch_neighbours(clap):
    audio = clips(3, seconds=1.0, seed=1)
    together = clap.embed_audio(audio, SR)
    alone = clap.embed_audio(audio[1], SR)
    other_neighbours = clap.embed_audio(np.stack([clips(1, seed=7)[0], audio[1]]), SR)
    assert together.shape == (3, 16) and torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-5)
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other_neighbours[1], together[1], atol=1e-5, rtol=1e-4)
    text_together, text_alone = clap.embed_text(CAPTIONS), clap.embed_text(CAPTIONS[1:2])
    torch.testing.assert_close(text_alone[0], text_together[1], atol=1e-5, rtol=1e-4)


def test_captions_are_truncated_to_77_tokens(clap):
    words = ("piano guitar drums bass " * 30).split()  # 120 words, one token each
    long, cut = " ".join(words), " ".join(words[: TEXT_MAX_LENGTH - 2])  # <s> + 75 words + </s> = 77
    different = " ".join(words[: TEXT_MAX_LENGTH - 3])
    emb = clap.embed_text([long, cut, different])
    torch.testing.assert_close(emb[0], emb[1], atol=1e-6, rtol=1e-5)
    assert (emb[0] - emb[2]).abs().max() > 1e-4  # one token fewer does change it: the test can tell


def test_clips_longer_than_the_window_use_their_first_10_seconds(clap):
    long = clips(1, seconds=11.0, seed=2)
    torch.testing.assert_close(
        clap.embed_audio(long, SR), clap.embed_audio(long[:, : 10 * SR], SR), atol=1e-5, rtol=1e-4
    )


def test_clap_score_needs_one_caption_per_clip(clap):
    with pytest.raises(ValueError, match="one caption per clip"):
        clap_score(clap, clips(2), SR, CAPTIONS)
    assert cosines(torch.eye(2), torch.eye(2)).tolist() == [1.0, 1.0]


# --- loading -----------------------------------------------------------------------------------------------------


def test_missing_clap_directory_names_the_setting(tmp_path):
    with pytest.raises(MissingWeightsError, match="eval.clap") as err:
        Clap(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_clap_hub_id_resolves_from_the_hf_cache_only(tiny_eval):
    with pytest.raises(MissingWeightsError, match="eval.clap"):
        Clap()
    # Lay the tiny model out as the hub cache would hold laion/larger_clap_music.
    import huggingface_hub.constants

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--laion--larger_clap_music"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_eval["clap"], repo / "snapshots" / ("0" * 40))
    assert Clap("laion/larger_clap_music").embed_text(["calm piano"]).shape == (1, 16)


def test_a_folder_without_tokenizer_files_is_missing_weights(tiny_eval, tmp_path):
    # transformers would silently fall back to a 5-token tokenizer and encode every caption as <unk>s.
    partial = tmp_path / "clap"
    shutil.copytree(tiny_eval["clap"], partial)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (partial / name).unlink(missing_ok=True)
    with pytest.raises(MissingWeightsError, match="CLAP tokenizer.*eval.clap"):
        Clap(partial)
