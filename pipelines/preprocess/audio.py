"""Decode, resample and split audio into fixed-length clips; the seeded order in which clips are tried.

Plain functions called per track by the Ray Data pipeline. `decode_track` is the whole decode stage and
never raises for bad audio: it returns a Reject (stage "decode" or "clip") instead. The training pipeline
decodes with `mono=False` (HTDemucs separates the stereo original, then its output is downmixed); the eval-set
references stay mono. `TrackClips` is how a track's clips reach clip selection: the decode task ships only
the clip that selection tries first, and the others are decoded again, on demand, where they are needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipelines.preprocess.jamendo import Reject

SAMPLE_RATE = 44100  # DAC 44.1 kHz
CLIP_SECONDS = 30.0


class AudioError(Exception):
    """An audio file that cannot be used; the message is the human-readable reason."""


def load_audio(path: str | Path, *, mono: bool = True) -> tuple[np.ndarray, int]:
    """Decode an audio file (MP3, WAV, FLAC, ... whatever libsndfile reads).

    Returns (x, sr) with x float32 of shape (T,), the mean of the channels, when `mono`; otherwise of shape
    (T, C) with C = 1 (a mono file) or 2 (stereo: the original channels, what HTDemucs was trained on). A file
    with more than 2 channels becomes (T, 1), the mean of all: libsndfile does not tell which channel is
    where (centre, LFE, surrounds), so no left/right placement would be reliably right, and the mean is what the
    mono path hears. Raises AudioError for a missing or empty file, one that cannot be decoded, one with no
    samples, or non-finite samples.
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
    if mono:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]  # (T,)
    elif x.shape[1] > 2:
        x = x.mean(axis=1, keepdims=True, dtype=np.float32)  # (T, 1)
    if not np.isfinite(x).all():
        raise AudioError(f"non-finite (NaN or inf) samples in {path.name}")
    return np.ascontiguousarray(x, dtype=np.float32), int(sr)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample audio (T,) or (T, C) from sr_in to sr_out with soxr HQ, each channel on its own.

    Returns float32 of shape (T * sr_out / sr_in,) or (T * sr_out / sr_in, C).
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected audio of shape (T,) or (T, C), got {x.shape}")
    if sr_in == sr_out:
        return x
    return np.asarray(soxr.resample(x, sr_in, sr_out, quality="HQ"), dtype=np.float32)


def split_clips(x: np.ndarray, sr: int, clip_seconds: float = CLIP_SECONDS) -> list[tuple[float, np.ndarray]]:
    """Non-overlapping clips [(start_seconds, samples (clip_seconds * sr, ...)), ...]; a last partial clip is dropped.

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
    mono: bool = True,
) -> tuple[list[tuple[float, np.ndarray]] | None, Reject | None]:
    """The decode stage for one track: load -> mono (when `mono`) -> resample -> split into clips.

    Returns (clips, None) on success, each clip (T,) or, with mono=False, (T, C) as `load_audio` gives it; or
    (None, Reject) with stage "decode" (unusable audio) or "clip" (shorter than one clip). Never raises for bad
    audio. Deterministic: the same file always gives bit-identical clips (TrackClips relies on it).
    """
    try:
        x, sr = load_audio(path, mono=mono)
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


class DeferredClip:
    """A clip that the decode task did not ship: numpy turns it into its samples on first use (`np.asarray`)."""

    def __init__(self, clips: TrackClips, index: int):
        self.clips, self.index = clips, index

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self.clips.load(self.index)
        return x if dtype is None else x.astype(dtype, copy=False)


class TrackClips(Sequence):
    """One track's clips as clip selection reads them: `clips[i]` is (start_seconds, samples (T, C) float32).

    The decode task ships only the clips that selection is likely to need (the first in `clip_order`: most
    tracks stop at their first clip), so the other clips never cross the object store. A clip that was not
    shipped is a `DeferredClip`; the first time one is read, the whole track is decoded again here with the
    same `decode_track` call the decode task made, so it is bit-identical to what that task would have
    shipped. (Decoding just that clip by offset would not be: soxr would resample its edges without the
    neighbouring samples, and libsndfile seeks MP3 sample-exactly only in some files.) `redecodes` counts
    those decodes (0 or 1).

    Args:
        starts: (n,) the start in seconds of every clip of the track.
        shipped: clip index -> its samples, the clips that came with the row.
        sample_rate, clip_seconds, mono: the arguments the decode task gave `decode_track`.
    """

    def __init__(
        self,
        track_id: str,
        path: str | Path,
        starts: Sequence[float],
        shipped: dict[int, np.ndarray],
        *,
        sample_rate: int = SAMPLE_RATE,
        clip_seconds: float = CLIP_SECONDS,
        mono: bool = False,
    ):
        self.track_id, self.path = track_id, path
        self.starts = [float(s) for s in starts]
        self.shipped = dict(shipped)
        self.decode_args = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, mono=mono)
        self.redecodes = 0
        self._decoded: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        return self.starts[i], self.shipped[i] if i in self.shipped else DeferredClip(self, i)

    def load(self, i: int) -> np.ndarray:
        """The samples of clip i, decoding the track again when it was not shipped (raises AudioError)."""
        if i in self.shipped:
            return self.shipped[i]
        if self._decoded is None:
            clips, reject = decode_track(self.track_id, self.path, **self.decode_args)
            self.redecodes += 1
            if reject is not None:
                raise AudioError(f"decoding again for clip {i}: {reject.reason}")
            if [s for s, _ in clips] != self.starts:
                raise AudioError(f"decoding {self.path} again gave {len(clips)} clips, not {len(self.starts)}")
            self._decoded = [c for _, c in clips]
        return self._decoded[i]
