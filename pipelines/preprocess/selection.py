"""One clip per track: visit the clips in a seeded order, keep the first that survives every rule.

Paper section 3 filters all clips (vocal removal, silence rule, caption mentions vocals) and then picks
one survivor at random. Visiting the clips in a seeded random order and stopping at the first survivor
gives the same distribution, but usually separates one clip instead of all of them (DESIGN decision 6).

Within a clip the cheapest rule goes first: a caption known without a model (tags, a caption file) is
checked before separation. Model captions come after separation and silence, from actor pools of their own
(`pipelines.preprocess.captioning`): `select_clip(captioner=None)` then stops at the first `candidates`
clips that survive separation and silence, and `choose_captioned` keeps the first of them whose caption
passes the vocal-cue rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipelines.preprocess.audio import clip_order
from pipelines.preprocess.captions import Captioner, caption_or_reject
from pipelines.preprocess.filters import DEFAULT_VOCAL_WORDS, mentions_vocals, silence_reject, vocal_reject
from pipelines.preprocess.jamendo import Reject, Track


def machine_error(error: BaseException) -> bool:
    """An error of the machine, not of the data: out of (GPU) memory, a CUDA failure. A model step raises these
    instead of recording a verdict, so Ray retries the batch or the job stops, and a rerun does those tracks again
    (a verdict is final: a rerun skips the track)."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "CUDA" in str(error)
    )


@dataclass
class Selection:
    """The outcome for one track: the kept clip (or None) and every clip- or track-level rejection."""

    track_id: str
    clip_start: float | None = None
    audio: np.ndarray | None = None  # (T,) float32, vocals removed
    caption: str | None = None
    clip_rejects: list[tuple[float, Reject]] = field(default_factory=list)  # (clip_start, why) dropped on the way
    track_reject: Reject | None = None  # set when no clip survived
    # captioner=None: the clips that survived separation and silence, in the order tried, awaiting captions
    candidates: list[tuple[float, np.ndarray]] = field(default_factory=list)


def _no_survivor(track_id: str, rejects: list[tuple[float, Reject]]) -> Reject:
    stages = Counter(r.stage for _, r in rejects)
    stage = next(iter(stages)) if len(stages) == 1 else "selection"
    counts = ", ".join(f"{n} {s}" for s, n in stages.most_common())
    return Reject(track_id, stage, f"no clip survived ({len(rejects)} clips: {counts})")


def _caption_verdict(
    captioner: Captioner, track: Track, start: float, clip: np.ndarray | None, sr: int, words: tuple[str, ...]
) -> tuple[str | None, Reject | None]:
    """(caption, None) for a caption that passes the vocal-cue rule, else (caption or None, Reject)."""
    caption, reject = caption_or_reject(captioner, track, start, clip, sr)
    if reject is None:
        reject = vocal_reject(track.track_id, start, caption, words)
    return caption, reject


def _track_level(
    track: Track, captioner: Captioner, caption: str | None, reject: Reject, words: tuple[str, ...]
) -> Reject:
    """The track's reject when every clip has the same failing caption (e.g. tags that name a voice)."""
    name = type(captioner).__name__
    if reject.stage == "vocal_filter":
        word = mentions_vocals(caption, words)
        return Reject(track.track_id, "vocal_filter", f"caption mentions {word!r}: {caption!r}")
    if caption is None and reject.reason.startswith(f"{name} has no caption"):
        return Reject(track.track_id, "caption", f"{name} has no caption for this track")
    return Reject(track.track_id, "caption", reject.reason)


def select_clip(
    track: Track,
    clips: list[tuple[float, np.ndarray]],
    *,
    separate: Callable[[np.ndarray], np.ndarray],
    captioner: Captioner | None,
    sample_rate: int,
    seed: int,
    max_silence_seconds: float = 15.0,
    threshold_db: float = -60.0,
    vocal_words: tuple[str, ...] = DEFAULT_VOCAL_WORDS,
    candidates: int = 1,
) -> Selection:
    """Apply vocal removal, the silence rule and the caption rules to the clips in seeded order.

    Args:
        clips: [(start_seconds, samples (T, C) or (T,) float32 at sample_rate), ...] of one track (a `TrackClips`
            in the pipeline: clips it did not ship are decoded when first read).
        separate: clip -> mono (T,) clip with vocals removed (HTDemucs on the stereo clip in production).
        captioner: None when captions come later from models: the first `candidates` clips that survive
            separation and silence are returned in `Selection.candidates`, uncaptioned.
    """
    out = Selection(track.track_id)
    order = clip_order(track.track_id, len(clips), seed)
    precomputed: dict[int, tuple[str | None, Reject | None]] = {}
    if captioner is not None and not getattr(captioner, "needs_audio", True):
        # Captions that need no audio are checked first, clip by clip, before paying for separation.
        precomputed = {
            i: _caption_verdict(captioner, track, clips[i][0], None, sample_rate, vocal_words) for i in order
        }
        outcomes = {(c, r.stage if r else None) for c, r in precomputed.values()}
        first = precomputed[order[0]] if order else (None, None)
        if len(outcomes) == 1 and first[1] is not None:  # one failing caption for every clip: a track verdict
            out.track_reject = _track_level(track, captioner, *first, vocal_words)
            return out
    for idx in order:
        start, audio = clips[idx]
        if idx in precomputed and precomputed[idx][1] is not None:
            out.clip_rejects.append((start, precomputed[idx][1]))
            continue
        try:
            cleaned = np.asarray(separate(audio), dtype=np.float32)
        except Exception as e:  # one bad clip must not stop the track, nor the job
            if machine_error(e):
                raise
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
        if reject is not None:
            out.clip_rejects.append((start, reject))
            continue
        if captioner is None:
            out.candidates.append((start, cleaned))
            if len(out.candidates) == candidates:
                return out
            continue
        if idx in precomputed:
            caption = precomputed[idx][0]
        else:
            caption, reject = _caption_verdict(captioner, track, start, cleaned, sample_rate, vocal_words)
        if reject is not None:
            out.clip_rejects.append((start, reject))
            continue
        out.clip_start, out.audio, out.caption = start, cleaned, caption
        return out
    if not out.candidates:
        out.track_reject = _no_survivor(track.track_id, out.clip_rejects)
    return out


def choose_captioned(
    track_id: str,
    candidates: list[tuple[float, str | None]],
    *,
    vocal_words: tuple[str, ...] = DEFAULT_VOCAL_WORDS,
    earlier_rejects: list[tuple[float, Reject]] = (),
    failures: dict[float, str] | None = None,
) -> Selection:
    """The first candidate (clip_start, model caption or None) whose caption exists and passes the vocal-cue rule.

    `earlier_rejects`: the clips that `select_clip` dropped before these (separation, silence), kept in the
    outcome so that a rejected track lists every clip it tried. `failures`: clip_start -> why a caption model
    failed on that clip, which becomes the clip's reject reason. The audio is not handled here.
    """
    out = Selection(track_id, clip_rejects=list(earlier_rejects))
    for start, caption in candidates:
        caption = (caption or "").strip()
        if not caption and failures and start in failures:
            reject = Reject(track_id, "caption", f"clip at {start:g} s: {failures[start]}")
        elif not caption:
            reject = Reject(track_id, "caption", f"the caption model gave no text for clip at {start:g} s")
        else:
            reject = vocal_reject(track_id, start, caption, vocal_words)
        if reject is None:
            out.clip_start, out.caption = start, caption
            return out
        out.clip_rejects.append((start, reject))
    out.track_reject = _no_survivor(track_id, out.clip_rejects)
    return out
