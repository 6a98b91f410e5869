"""captions: model: tiny random Qwen2-Audio and Llama through the production loaders, the rephrase prompt, the
caption actors on hand-built batches (cache, vocal-cue rule on the final caption), and the pipeline on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import load_config
from configs.schema import ConfigError
from pipelines.preprocess.captioning import (
    AUDIO_PROMPT,
    REPHRASE_SYSTEM,
    AudioCaptioner,
    CaptionCache,
    Rephraser,
    caption_key,
    compact_cache,
    rephrase_messages,
    split_windows,
)
from pipelines.preprocess.steps import OK, CaptionRephraser, WindowCaptioner, batch_of
from pipelines.preprocess.tokens import read_parts

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 44100
CLIP = 6.0  # short clips and 2 s windows keep the tiny models (and DAC in the Ray test) quick
MODEL_KEYS = ("preprocess.captions=model", "preprocess.clip_seconds=6", "preprocess.caption_window_seconds=2",
              "preprocess.caption_max_new_tokens=8", "preprocess.caption_batch_size=2")  # fmt: skip


def model_config(captioners: dict[str, str], cache: Path, *overrides: str):
    return load_config(
        "debug",
        [*MODEL_KEYS, f"preprocess.caption_cache_dir={cache}",
         *(f"preprocess.{k}={v}" for k, v in captioners.items()), *overrides],
    )  # fmt: skip


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def test_audio_captioner_captions_each_window_greedily(tiny_captioners):
    captioner = AudioCaptioner(tiny_captioners["caption_audio_model"], max_new_tokens=8, batch_size=2)
    assert AUDIO_PROMPT in captioner.prompt and "<|AUDIO|>" in captioner.prompt  # the chat template's placeholder
    windows = split_windows(noise(CLIP, 0), SR, 3, 2.0)
    assert [len(w) for w in windows] == [2 * SR] * 3
    captions = captioner(windows, SR)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captioner(windows, SR) == captions  # greedy: the same text every time
    with pytest.raises(ValueError, match="do not fit"):
        split_windows(noise(CLIP, 0), SR, 4, 2.0)


def test_rephrase_prompt_holds_the_window_captions_in_order(tiny_captioners):
    windows = ["Calm piano chords.", "A soft synth pad joins.", "The piano fades out."]
    messages = rephrase_messages(windows, 10.0)
    assert messages[0] == {"role": "system", "content": REPHRASE_SYSTEM}
    user = messages[1]["content"]
    assert "3 descriptions of consecutive 10-second parts" in user
    assert "\n1. Calm piano chords.\n2. A soft synth pad joins.\n3. The piano fades out.\n" in user  # in order
    rephraser = Rephraser(tiny_captioners["caption_text_model"], max_new_tokens=8, window_seconds=10.0)
    prompt = rephraser.prompt(windows)  # what the model continues: the chat template around the messages
    assert all(w in prompt for w in windows) and REPHRASE_SYSTEM in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = rephraser([windows, windows[:2]])
    assert len(out) == 2 and all(out) and rephraser([windows]) == out[:1]


def test_missing_caption_models_name_their_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess.caption_audio_model"):
        AudioCaptioner(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="preprocess.caption_text_model"):
        Rephraser("nobody/no-such-rephraser")
    with pytest.raises(
        ConfigError,
        match="caption_model is no longer a setting: .*preprocess.caption_audio_model .*preprocess.caption_text_model",
    ):
        load_config("debug", ["preprocess.caption_model=some/model"])
    with pytest.raises(ConfigError, match="preprocess.caption_windows"):
        load_config("debug", ["preprocess.captions=model", "preprocess.caption_window_seconds=11"])


def selector_batch(starts: list[list[float]]) -> dict[str, np.ndarray]:
    """What ClipSelector hands on with captions: model: per track, its candidate clips (vocals removed)."""
    rows = [
        dict(track_id=f"track_000000{n}", status=OK, stage="", reason="", caption="", clip_start=-1.0,
             audio=np.zeros(0, np.float32), cand_starts=np.array(s, dtype=np.float64),
             cand_audio=np.stack([noise(CLIP, 10 * n + i) for i in range(len(s))]),
             clip_rejects=json.dumps([dict(track_id=f"track_000000{n}", stage="silence", reason="r", clip_start=99.0)]))
        for n, s in enumerate(starts)
    ]  # fmt: skip
    return batch_of(rows)


def run_steps(cfg, batch):
    windows = WindowCaptioner(cfg.to_dict())
    rephraser = CaptionRephraser(cfg.to_dict())
    out = rephraser(windows(batch))
    return out, windows, rephraser


def test_caption_actors_keep_the_first_candidate_and_cache_every_caption(tiny_captioners, tmp_path):
    cfg = model_config(tiny_captioners, tmp_path / "cache")
    batch = selector_batch([[0.0, 6.0], [12.0]])
    out, windows, rephraser = run_steps(cfg, batch)
    assert list(out["status"]) == [OK, OK] and list(out["clip_start"]) == [0.0, 12.0]
    assert "cand_audio" not in out and "cand_windows" not in out
    np.testing.assert_array_equal(out["audio"][0], batch["cand_audio"][0][0])  # the kept clip's audio goes on
    cache = CaptionCache(tmp_path / "cache", caption_key(cfg.preprocess))
    assert len(cache.entries) == 3  # both candidates of track 0 were captioned, and track 1's
    for row, start in ((0, 0.0), (1, 12.0)):
        cached_windows, caption = cache.get(str(out["track_id"][row]), start)
        assert len(cached_windows) == 3 and out["caption"][row] == caption
    assert json.loads(out["clip_rejects"][0]) == [dict(track_id="track_0000000", stage="silence", reason="r",
                                                       clip_start=99.0)]  # fmt: skip

    # A rerun finds every caption in the cache: the models are never loaded, the captions are the same.
    again, windows, rephraser = run_steps(cfg, batch)
    assert windows.model is None and rephraser.model is None
    assert list(again["caption"]) == list(out["caption"])
    compact_cache(tmp_path / "cache")  # what a run does at start: one part, the same captions
    assert len(list((tmp_path / "cache").glob("part-*.parquet"))) == 1
    assert CaptionCache(tmp_path / "cache", caption_key(cfg.preprocess)).entries == cache.entries
    # A changed setting (here the rephraser's token budget) is another key: nothing is reused by mistake.
    other = model_config(tiny_captioners, tmp_path / "cache", "preprocess.caption_max_new_tokens=6")
    _, windows, _ = run_steps(other, batch)
    assert windows.model is not None and len(list((tmp_path / "cache").glob("part-*.parquet"))) > 1


def test_vocal_cue_rule_applies_to_the_rephrased_caption(tiny_captioners, tmp_path):
    cfg = model_config(tiny_captioners, tmp_path / "cache")
    batch = selector_batch([[0.0, 6.0]])
    first, *_ = run_steps(cfg, batch)
    caption = str(first["caption"][0])
    cache = CaptionCache(tmp_path / "cache", caption_key(cfg.preprocess))
    window_words = {w for text in cache.get("track_0000000", 0.0)[0] for w in text.split()}
    # A word of the final caption that no window caption has: the rule must see the rephrased text itself.
    words = [w for w in caption.split() if w.isalpha() and w not in window_words] or [caption.split()[0]]
    vocal = model_config(tiny_captioners, tmp_path / "cache", f"preprocess.vocal_words=[{words[0]}]")
    out, *_ = run_steps(vocal, batch)
    rejects = json.loads(out["clip_rejects"][0])
    assert {"clip_start": 0.0, "stage": "vocal_filter"}.items() <= rejects[1].items()
    assert caption in rejects[1]["reason"]
    second = cache.get("track_0000000", 6.0)[1]
    if words[0] in second.split():  # the other candidate says it too: the whole track goes
        assert out["status"][0] != OK and out["stage"][0] in ("vocal_filter", "selection")
    else:
        assert out["status"][0] == OK and out["clip_start"][0] == 6.0 and out["caption"][0] == second


def test_pipeline_captions_by_model_on_ray(corpus, tiny_pretrained, tiny_captioners, tmp_path, ray_session):
    """The whole pipeline with captions: model (two actor pools, tiny real models): every kept clip's caption is
    the rephrased one in the caption cache next to the tokens, which a rerun reads instead of the models (that
    part is checked on the actors themselves above: one Ray run costs tens of seconds here)."""
    from pipelines.preprocess.graph import run_preprocess
    from tests.conftest import preprocess_config

    overrides = [*MODEL_KEYS, "preprocess.caption_candidates=2",
                 *(f"preprocess.{k}={v}" for k, v in tiny_captioners.items())]  # fmt: skip
    cfg = preprocess_config(corpus, tiny_pretrained, tmp_path, *overrides)
    summary = run_preprocess(cfg)
    tokens = read_parts(cfg.data.tokens_dir).to_pylist()
    assert summary.kept == len(tokens) >= 1
    assert summary.kept + sum(summary.rejected_tracks.values()) == len(corpus.tracks)
    cache = CaptionCache(Path(cfg.data.tokens_dir).parent / "caption_cache", caption_key(cfg.preprocess))
    for row in tokens:
        assert row["clip_start"] % CLIP == 0.0 and row["n_frames"] == 517  # 6 s at 44.1 kHz / 512
        windows, caption = cache.get(row["track_id"], row["clip_start"])
        assert row["caption"] == caption and len(windows) == 3
        assert np.asarray(row["text_emb"]).shape == (row["text_len"], 32)
    assert len(cache.entries) >= len(tokens)


def test_the_caption_key_follows_the_separator():
    """Clips are captioned after vocal removal: another separator must not reuse a caption."""
    from configs import load_config

    p = load_config("debug").preprocess
    other = load_config("debug", ["preprocess.separator=htdemucs_ft"]).preprocess
    assert caption_key(p) != caption_key(other) and caption_key(p) == caption_key(load_config("debug").preprocess)
