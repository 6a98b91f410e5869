"""Clip filters from the paper: the silence rule and the vocal-mention rule on captions.

Plain functions; `silence_reject` and `vocal_reject` wrap the rules into the pipeline's Reject records.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from pipelines.preprocess.jamendo import Reject

MAX_SILENCE_SECONDS = 15.0
SILENCE_THRESHOLD_DB = -60.0

DEFAULT_VOCAL_WORDS = (
    "vocal", "vocals", "voice", "voices", "singer", "singers", "singing", "sung", "sings", "lyrics", "lyric",
    "choir", "choral", "rap", "rapper", "rapping", "vocalist", "acapella", "a cappella", "chant", "chanting",
    "humming",
)  # fmt: skip


def silent_seconds(
    x: np.ndarray, sr: int, *, threshold_db: float = SILENCE_THRESHOLD_DB, frame_seconds: float = 0.1
) -> float:
    """Total duration (s) of the frames of x (T,) whose RMS is below threshold_db dBFS (full scale = 1.0).

    Frames are non-overlapping, frame_seconds long; a shorter last frame counts with its own length.
    Silent frames need not be contiguous: the rule is about how much of the clip is silent.
    """
    frame = int(round(frame_seconds * sr))
    if frame <= 0:
        raise ValueError(f"frame length must be positive, got {frame_seconds} s at {sr} Hz")
    x = np.asarray(x, dtype=np.float64)
    n_full = len(x) // frame
    # Compare mean squares against the threshold's power: no log of zero for digital silence.
    threshold_power = 10.0 ** (threshold_db / 10.0)
    power = (x[: n_full * frame].reshape(n_full, frame) ** 2).mean(axis=1)  # (n_full,)
    silent = int((power < threshold_power).sum()) * frame
    tail = x[n_full * frame :]
    if len(tail) and (tail**2).mean() < threshold_power:
        silent += len(tail)
    return silent / sr


def is_too_silent(
    x: np.ndarray,
    sr: int,
    *,
    max_silence_seconds: float = MAX_SILENCE_SECONDS,
    threshold_db: float = SILENCE_THRESHOLD_DB,
    frame_seconds: float = 0.1,
) -> bool:
    """The paper's rule: drop a clip with *more than* 15 s of silence (exactly 15 s is kept)."""
    return silent_seconds(x, sr, threshold_db=threshold_db, frame_seconds=frame_seconds) > max_silence_seconds


@lru_cache(maxsize=16)
def _vocal_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so "vocals" wins over "vocal" and "a cappella" is matched as one phrase; inner
    # spaces match any run of whitespace or hyphens ("a-cappella"). Word boundaries are lookarounds on
    # \w, so "rapid", "therapy" and "trap" do not match "rap", while "rap-rock" and "singer's" do.
    alternatives = [
        r"[\s\-]+".join(re.escape(part) for part in w.split()) for w in sorted(set(words), key=len, reverse=True)
    ]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def mentions_vocals(caption: str, words: tuple[str, ...] = DEFAULT_VOCAL_WORDS) -> str | None:
    """The first vocal word or phrase in the caption (lowercase, as written in `words`), or None.

    Any mention counts, negated or not: "instrumental, no vocals" matches "vocals". The paper drops clips
    whose caption mentions vocals, and a caption that talks about vocals (even their absence) teaches
    the model to associate the prompt with singing; captioners also often negate wrongly. So the rule is
    deliberately conservative and loses a few truly instrumental clips.
    """
    if not caption:
        return None
    words = tuple(w.strip().lower() for w in words if w.strip())
    if not words:
        return None
    m = _vocal_pattern(words).search(caption)
    if m is None:
        return None
    return " ".join(re.split(r"[\s\-]+", m.group(0).lower()))


def silence_reject(
    track_id: str,
    clip_start: float,
    x: np.ndarray,
    sr: int,
    *,
    max_silence_seconds: float = MAX_SILENCE_SECONDS,
    threshold_db: float = SILENCE_THRESHOLD_DB,
) -> Reject | None:
    """Reject(stage="silence") for a clip with more than max_silence_seconds of silence, else None."""
    silent = silent_seconds(x, sr, threshold_db=threshold_db)
    if silent > max_silence_seconds:
        reason = (
            f"clip at {clip_start:g} s has {silent:.1f} s below {threshold_db:g} dBFS (max {max_silence_seconds:g} s)"
        )
        return Reject(track_id, "silence", reason)
    return None


def vocal_reject(
    track_id: str, clip_start: float, caption: str, words: tuple[str, ...] = DEFAULT_VOCAL_WORDS
) -> Reject | None:
    """Reject(stage="vocal_filter") when the clip's caption mentions vocals, else None."""
    word = mentions_vocals(caption, words)
    if word is not None:
        return Reject(track_id, "vocal_filter", f"caption of clip at {clip_start:g} s mentions {word!r}: {caption!r}")
    return None
