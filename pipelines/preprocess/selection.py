"""One clip per track: visit the clips in a seeded order, keep the first that survives every rule.

Paper section 3 filters all clips (vocal removal, silence rule, caption mentions vocals) and then picks
one survivor at random. Visiting the clips in a seeded random order and stopping at the first survivor
gives the same distribution, but usually separates one clip instead of all of them (DESIGN decision 6).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipelines.preprocess.audio import clip_order
from pipelines.preprocess.captions import Captioner, FileCaptioner, TagCaptioner, caption_or_reject
from pipelines.preprocess.filters import DEFAULT_VOCAL_WORDS, mentions_vocals, silence_reject, vocal_reject
from pipelines.preprocess.jamendo import Reject, Track

# Captioners whose caption depends on the track only: their verdict is known before any separation.
TRACK_LEVEL_CAPTIONERS = (TagCaptioner, FileCaptioner)


@dataclass
class Selection:
    """The outcome for one track: the kept clip (or None) and every clip- or track-level rejection."""

    track_id: str
    clip_start: float | None = None
    audio: np.ndarray | None = None  # (T,) float32, vocals removed
    caption: str | None = None
    clip_rejects: list[tuple[float, Reject]] = field(default_factory=list)  # (clip_start, why) dropped on the way
    track_reject: Reject | None = None  # set when no clip survived


def _no_survivor(track_id: str, rejects: list[tuple[float, Reject]]) -> Reject:
    stages = Counter(r.stage for _, r in rejects)
    stage = next(iter(stages)) if len(stages) == 1 else "selection"
    counts = ", ".join(f"{n} {s}" for s, n in stages.most_common())
    return Reject(track_id, stage, f"no clip survived ({len(rejects)} clips: {counts})")


def select_clip(
    track: Track,
    clips: list[tuple[float, np.ndarray]],
    *,
    separate: Callable[[np.ndarray], np.ndarray],
    captioner: Captioner,
    sample_rate: int,
    seed: int,
    max_silence_seconds: float = 15.0,
    threshold_db: float = -60.0,
    vocal_words: tuple[str, ...] = DEFAULT_VOCAL_WORDS,
) -> Selection:
    """Apply vocal removal, the silence rule and the caption rules to the clips in seeded order.

    Args:
        clips: [(start_seconds, samples (T,) float32 mono at sample_rate), ...] of one track.
        separate: mono clip -> mono clip with vocals removed (HTDemucs in production).
    """
    out = Selection(track.track_id)
    if isinstance(captioner, TRACK_LEVEL_CAPTIONERS):
        # The caption is the same for every clip: check it once, before paying for separation.
        name = type(captioner).__name__
        try:
            caption = (captioner(track, clips[0][1], sample_rate) or "").strip()
        except Exception as e:  # recorded, never raised
            out.track_reject = Reject(track.track_id, "caption", f"{name} failed: {e!r}")
            return out
        word = mentions_vocals(caption, vocal_words) if caption else None
        if not caption:
            out.track_reject = Reject(track.track_id, "caption", f"{name} has no caption for this track")
        elif word is not None:
            out.track_reject = Reject(track.track_id, "vocal_filter", f"caption mentions {word!r}: {caption!r}")
        if out.track_reject is not None:
            return out
    for idx in clip_order(track.track_id, len(clips), seed):
        start, audio = clips[idx]
        try:
            cleaned = np.asarray(separate(audio), dtype=np.float32)
        except Exception as e:  # one bad clip must not stop the track, nor the job
            out.clip_rejects.append((start, Reject(track.track_id, "separation", f"clip at {start:g} s: {e!r}")))
            continue
        reject = silence_reject(
            track.track_id,
            start,
            cleaned,
            sample_rate,
            max_silence_seconds=max_silence_seconds,
            threshold_db=threshold_db,
        )
        caption = None
        if reject is None:
            caption, reject = caption_or_reject(captioner, track, start, cleaned, sample_rate)
        if reject is None:
            reject = vocal_reject(track.track_id, start, caption, vocal_words)
        if reject is not None:
            out.clip_rejects.append((start, reject))
            continue
        out.clip_start, out.audio, out.caption = start, cleaned, caption
        return out
    out.track_reject = _no_survivor(track.track_id, out.clip_rejects)
    return out
