"""The audio path from decode to clip selection, without Ray: channels kept for HTDemucs, only the first clip to
try shipped, the others decoded again on demand (bit-identical), and the bytes moved counted."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from configs import load_config
from pipelines.preprocess.audio import (
    DeferredClip,
    TrackClips,
    clip_order,
    decode_track,
    load_audio,
    resample,
)
from pipelines.preprocess.captions import TagCaptioner
from pipelines.preprocess.jamendo import Track
from pipelines.preprocess.selection import select_clip
from pipelines.preprocess.steps import OK, ClipSelector, batch_of, decode_step
from pipelines.preprocess.tokens import read_parts
from tests.preprocess.test_stages import sine

SR = 44100


def row(path: Path, track_id: str = "track_0000042") -> dict:
    track = Track(track_id, "artist_000001", "album_000001", path.name, 0.0, ["genre---rock", "instrument---piano"])
    return dict(track_id=track_id, artist_id=track.artist_id, path=str(path), track_json=json.dumps(asdict(track)))


def test_load_audio_keeps_channels(tmp_path: Path):
    left, right = sine(440, 0.5, amp=0.3), sine(660, 0.5, amp=0.1)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    x, _ = load_audio(tmp_path / "stereo.wav", mono=False)
    np.testing.assert_array_equal(x, np.stack([left, right], 1))  # (T, 2), untouched
    np.testing.assert_array_equal(load_audio(tmp_path / "stereo.wav")[0], (left + right) / 2)  # the mono path

    sf.write(tmp_path / "mono.wav", left, SR, subtype="FLOAT")
    assert load_audio(tmp_path / "mono.wav", mono=False)[0].shape == (len(left), 1)

    six = np.stack([sine(110 * (i + 1), 0.5) for i in range(6)], 1)  # 5.1: layout unknown to libsndfile
    sf.write(tmp_path / "six.wav", six, SR, subtype="FLOAT")
    x, _ = load_audio(tmp_path / "six.wav", mono=False)
    np.testing.assert_allclose(x[:, 0], six.mean(1), atol=1e-7)
    assert x.shape == (len(left), 1)

    # each channel is resampled on its own, as if it were a mono signal
    y = resample(np.stack([left, right], 1), SR, 48000)
    assert y.shape == (48000 // 2, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y[:, 1], resample(right, SR, 48000), atol=1e-6)


def test_stereo_clip_reaches_the_separator_with_both_channels(tmp_path: Path, tiny_pretrained):
    """A 'voice' panned hard left over music in both channels: HTDemucs gets the two channels as they are, and
    clip selection hands on mono accompaniment of the clip's length. The clip tried first is silent, so the
    selector actor decodes the track again for the other one (it was not shipped)."""
    seconds, track_id = 4.0, "track_0000042"
    music = sine(110, seconds, amp=0.2) + sine(165, seconds, amp=0.1)
    voice = sine(523, seconds, amp=0.3) * (1 + 0.3 * np.sin(2 * np.pi * 5 * np.arange(len(music)) / SR))
    silent, panned = clip_order(track_id, 2, seed=0)
    x = np.zeros((2 * len(music), 2), np.float32)
    x[panned * len(music) : (panned + 1) * len(music)] = np.stack([music + voice, music], 1)
    path = tmp_path / "panned.wav"
    sf.write(path, x, SR, subtype="FLOAT")

    cfg = load_config(
        "debug",
        [
            f"preprocess.separator={tiny_pretrained['separator']}",
            f"preprocess.clip_seconds={seconds}",
            "preprocess.max_silence_seconds=2.0",
        ],
    )
    selector = ClipSelector(cfg.to_dict())
    seen = []
    hook = selector.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        decoded = decode_step(row(path, track_id), sample_rate=SR, clip_seconds=seconds, seed=0)
        assert decoded["status"] == OK and decoded["clip_index"].tolist() == [silent]
        assert decoded["clips"].shape == (1, len(music), 2) and not decoded["clips"].any()
        out = selector(batch_of([decoded]))
    finally:
        hook.remove()

    assert out["status"][0] == OK, out["reason"][0]
    assert out["clip_start"][0] == panned * seconds and out["selector_decodes"][0] == 1
    assert json.loads(out["clip_rejects"][0])[0]["stage"] == "silence"
    audio = out["audio"][0]
    assert audio.dtype == np.float32 and audio.shape == (len(music),)  # mono at 44.1 kHz, the clip's length
    assert out["select_bytes"][0] == audio.nbytes

    assert len(seen) == 2 and all(mix.shape[:2] == (1, 2) for mix in seen)  # (B, C, T): the two clips tried
    mix = seen[1][0]  # the panned clip, zero-padded on both sides to the model's segment
    left_minus_right = (mix[0] - mix[1]).numpy()
    assert np.abs(left_minus_right).max() > 0.5  # the channels differ: the voice is only on the left
    # and what differs is the voice (normalised by the mix's std, as demucs does)
    pad = (len(left_minus_right) - len(voice)) // 2
    corr = max(np.corrcoef(left_minus_right[k : k + len(voice)], voice)[0, 1] for k in range(pad - 2, pad + 3))
    assert corr > 0.99, corr


@pytest.mark.parametrize("fmt", ["MP3", "WAV"])
def test_unshipped_clips_decode_bit_identical(tmp_path: Path, fmt: str):
    """The decode task ships one clip; any other clip, decoded again where selection needs it, is exactly what
    the decode task would have shipped (MP3 included: no seeking, the whole track is decoded again)."""
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((int(9.5 * 48000), 2))).astype(np.float32)
    path = tmp_path / f"track.{fmt.lower()}"
    sf.write(path, stereo, 48000, format=fmt)  # 48 kHz: the resampler runs too
    eager, _ = decode_track("track_0000042", path, sample_rate=SR, clip_seconds=2.0, mono=False)
    assert len(eager) == 4 and eager[0][1].shape == (2 * SR, 2)

    decoded = decode_step(row(path), sample_rate=SR, clip_seconds=2.0, seed=7)
    first = clip_order("track_0000042", 4, seed=7)[0]
    assert decoded["clip_index"].tolist() == [first]
    assert decoded["decode_bytes"] == decoded["clips"].nbytes == 2 * SR * 2 * 4  # one stereo float32 clip
    np.testing.assert_array_equal(decoded["clips"][0], eager[first][1])

    clips = TrackClips("track_0000042", path, decoded["clip_starts"], {first: decoded["clips"][0]},
                       sample_rate=SR, clip_seconds=2.0)  # fmt: skip
    assert len(clips) == 4 and clips[first][1] is clips.shipped[first] and clips.redecodes == 0
    for i, (start, audio) in enumerate(eager):
        got_start, got = clips[i]
        assert got_start == start
        assert isinstance(got, DeferredClip) == (i != first)
        assert np.array_equal(np.asarray(got), audio), f"clip {i} differs"
    assert clips.redecodes == 1  # once for all the unshipped clips


def test_selection_over_shipped_clips_matches_selection_over_all(tmp_path: Path):
    """Same kept clip, bit for bit, and the same rejections as when every clip was passed: here the first clip
    in the seeded order is silent, so selection has to decode the track again for the next one."""
    track_id, seed, seconds = "track_0000042", 3, 2.0
    order = clip_order(track_id, 4, seed)
    x = np.stack([sine(220, 8.0, amp=0.3), sine(330, 8.0, amp=0.1)], 1)
    first = order[0]
    x[int(first * seconds * SR) : int((first + 1) * seconds * SR)] = 0.0
    path = tmp_path / "track.wav"
    sf.write(path, x, SR, subtype="FLOAT")

    def run(clips):
        track = Track(track_id, "artist_000001", "album_000001", "x.wav", 8.0, ["genre---rock"])
        return select_clip(track, clips, separate=lambda a: np.asarray(a).mean(1), captioner=TagCaptioner(),
                           sample_rate=SR, seed=seed, max_silence_seconds=1.0)  # fmt: skip

    eager, _ = decode_track(track_id, path, sample_rate=SR, clip_seconds=seconds, mono=False)
    decoded = decode_step(row(path, track_id), sample_rate=SR, clip_seconds=seconds, seed=seed)
    lazy = TrackClips(track_id, path, decoded["clip_starts"], {first: decoded["clips"][0]},
                      sample_rate=SR, clip_seconds=seconds)  # fmt: skip
    want, got = run(eager), run(lazy)
    assert got.clip_start == want.clip_start == order[1] * seconds
    assert np.array_equal(got.audio, want.audio)
    assert [(s, r.stage) for s, r in got.clip_rejects] == [(first * seconds, "silence")]
    assert lazy.redecodes == 1


def test_decode_rejects_ship_nothing(tmp_path: Path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    out = decode_step(row(tmp_path / "empty.mp3"), sample_rate=SR, clip_seconds=30.0, seed=0)
    assert out["status"] != OK and out["stage"] == "decode" and out["decode_bytes"] == 0


def test_summary_counts_the_audio_moved(preprocessed, corpus):
    """One real run (tests/conftest.py): each decoded track ships one mono 30 s clip to selection, each kept
    track one clip on to the codec; the summary adds them up per kept clip."""
    _, summary = preprocessed
    clip_bytes = 30 * SR * 4  # the corpus is mono MP3: one float32 channel
    decoded = [t for t in corpus.tracks if t.kind not in ("sdd", "malformed", "corrupt", "empty", "missing",
                                                          "nonfinite", "short")]  # fmt: skip
    assert summary.audio_bytes_decode == len(decoded) * clip_bytes
    assert summary.audio_bytes_select == summary.kept * clip_bytes
    per_kept = (len(decoded) + summary.kept) * clip_bytes / summary.kept / 1e6
    assert summary.audio_mb_per_kept_clip == pytest.approx(per_kept)
    # selection decodes a track again exactly when a clip of it was rejected and it has another clip to try
    cfg, _ = preprocessed
    retried = {r["track_id"] for r in read_parts(cfg.preprocess.rejects_dir).to_pylist() if r["clip_start"] is not None}
    paths = {t.track_id: corpus.audio_dir / t.path for t in corpus.tracks}
    assert summary.selector_decodes == sum(len(decode_track(t, paths[t])[0]) > 1 for t in retried)
    assert "audio moved per kept clip" in summary.table()
