"""Decode, resample and split audio into fixed-length clips; the seeded order in which clips are tried.

Plain functions called per track by the Ray Data pipeline. `decode_track` is the whole decode stage and
never raises for bad audio: it returns a Reject (stage "decode" or "clip") instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipelines.preprocess.jamendo import Reject

SAMPLE_RATE = 44100  # DAC 44.1 kHz
CLIP_SECONDS = 30.0


class AudioError(Exception):
    """An audio file that cannot be used; the message is the human-readable reason."""


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file (MP3, WAV, FLAC, ... whatever libsndfile reads) to mono.

    Returns (x, sr) with x float32 of shape (T,), the mean of the channels. Raises AudioError for a
    missing or empty file, one that cannot be decoded, one with no samples, or non-finite samples.
    """
    path = Path(path)
    # libsndfile reports undecodable MP3s as "file does not exist", so check existence ourselves first.
    if not path.exists():
        raise AudioError(f"file not found: {path}")
    if not path.is_file():
        raise AudioError(f"not a regular file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"empty file (0 bytes): {path}")
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"cannot decode {path.name}: {e}") from e
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AudioError(f"no audio samples in {path.name}")
    x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]  # (T,)
    if not np.isfinite(x).all():
        raise AudioError(f"non-finite (NaN or inf) samples in {path.name}")
    return np.ascontiguousarray(x, dtype=np.float32), int(sr)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono audio (T,) from sr_in to sr_out with soxr HQ; returns float32 (T * sr_out / sr_in,)."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape (T,), got {x.shape}")
    if sr_in == sr_out:
        return x
    return np.asarray(soxr.resample(x, sr_in, sr_out, quality="HQ"), dtype=np.float32)


def split_clips(x: np.ndarray, sr: int, clip_seconds: float = CLIP_SECONDS) -> list[tuple[float, np.ndarray]]:
    """Non-overlapping clips [(start_seconds, samples (clip_seconds * sr,)), ...]; a last partial clip is dropped.

    Clips are copies, so holding one does not keep the whole track in memory.
    """
    clip_len = int(round(clip_seconds * sr))
    if clip_len <= 0:
        raise ValueError(f"clip length must be positive, got {clip_seconds} s at {sr} Hz")
    return [(i * clip_len / sr, x[i * clip_len : (i + 1) * clip_len].copy()) for i in range(len(x) // clip_len)]


def decode_track(
    track_id: str,
    path: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    clip_seconds: float = CLIP_SECONDS,
) -> tuple[list[tuple[float, np.ndarray]] | None, Reject | None]:
    """The decode stage for one track: load -> mono -> resample -> split into clips.

    Returns (clips, None) on success, or (None, Reject) with stage "decode" (unusable audio) or "clip"
    (shorter than one clip). Never raises for bad audio.
    """
    try:
        x, sr = load_audio(path)
    except AudioError as e:
        return None, Reject(track_id, "decode", str(e))
    try:
        x = resample(x, sr, sample_rate)
    except ValueError as e:  # soxr rejects some inputs (e.g. absurd sample rates)
        return None, Reject(track_id, "decode", f"cannot resample {Path(path).name} from {sr} Hz: {e}")
    clips = split_clips(x, sample_rate, clip_seconds)
    if not clips:
        duration = len(x) / sample_rate
        return None, Reject(
            track_id, "clip", f"track is {duration:.2f} s long, shorter than one {clip_seconds:g} s clip"
        )
    return clips, None


def clip_order(track_id: str, n_clips: int, seed: int) -> list[int]:
    """A random permutation of range(n_clips), fixed by (seed, track_id).

    The pipeline tries a track's clips in this order and keeps the first that passes every filter. The
    seed comes from sha256 (not `hash()`, which is salted per process), so every worker and every run
    agrees on the order.
    """
    if n_clips < 0:
        raise ValueError(f"n_clips must be >= 0, got {n_clips}")
    digest = hashlib.sha256(f"{seed}:{track_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [int(i) for i in rng.permutation(n_clips)]
