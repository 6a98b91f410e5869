"""Captioners known without a model: text for a clip from Jamendo tags or from a file of captions.

Both share one interface, `Captioner.__call__(track, clip, sr, clip_start=None) -> str | None`; None means no
caption is available and the pipeline rejects the clip with stage "caption" (`caption_or_reject` does that, and
also turns a captioner's exception into a Reject). `build_captioner` is the one place that picks one by name.
Neither looks at the audio (`needs_audio = False`), so clip selection checks their captions before it pays for
vocal separation.

The paper's captions (LP-MusicCaps on each 10 s window, rephrased by LLaMA-3) come from models: that is
`captions: model`, the two-stage captioner of `pipelines/preprocess/captioning.py`, which runs as its own Ray
Data actor pools after separation; or compute them elsewhere and bring them in through `FileCaptioner`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipelines.preprocess.filters import mentions_vocals
from pipelines.preprocess.jamendo import Reject, Track, normalize_track_id, tags_by_category

# File captions match a clip whose start is within this many seconds of the file's clip_start.
CLIP_START_TOLERANCE = 1e-3


class Captioner(Protocol):
    needs_audio: bool  # False: the caption does not depend on the samples (checked before separation)

    def __call__(
        self, track: Track, clip: np.ndarray | None, sr: int | None, clip_start: float | None = None
    ) -> str | None:
        """Caption for one clip (T,) of `track` at sample rate sr starting at clip_start s, or None."""
        ...


def caption_or_reject(
    captioner: Captioner, track: Track, clip_start: float, clip: np.ndarray | None, sr: int
) -> tuple[str | None, Reject | None]:
    """Run a captioner on one clip; (caption, None), or (None, Reject(stage="caption")). Never raises."""
    name = type(captioner).__name__
    try:
        caption = captioner(track, clip, sr, clip_start=clip_start)
    except Exception as e:  # a per-clip failure must become a recorded reject, not a crashed pipeline
        return None, Reject(track.track_id, "caption", f"{name} failed on clip at {clip_start:g} s: {e!r}")
    caption = caption.strip() if isinstance(caption, str) else None
    if not caption:
        return None, Reject(track.track_id, "caption", f"{name} has no caption for clip at {clip_start:g} s")
    return caption, None


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


# Phrasings picked per track (by a hash of its id), so tag captions do not all share one template.
_NOUNS = ("track", "piece", "tune", "composition")
_INSTRUMENT_CLAUSES = ("with {}", "featuring {}", "built around {}", "played on {}")
_MOOD_CLAUSES = ("with {a} {m} mood", "evoking {a} {m} atmosphere", "in {a} {m} mood", "setting {a} {m} tone")


class TagCaptioner:
    """A deterministic sentence from the track's Jamendo tags, e.g. "An upbeat rock track with piano and drums."

    The wording varies with the track id (not the clip), so one track always gets the same caption and the
    corpus is not one template. Vocal instruments (instrument---voice) are always named, listed first, so that
    the vocal filter can act on tag captions. A track without tags gets "A piece of music.".
    """

    def __init__(self, max_genres: int = 2, max_instruments: int = 3, max_moods: int = 2):
        self.max_genres = max_genres
        self.max_instruments = max_instruments
        self.max_moods = max_moods

    needs_audio = False

    def __call__(
        self, track: Track, clip: np.ndarray | None = None, sr: int | None = None, clip_start: float | None = None
    ) -> str:
        cats = tags_by_category(track.tags)
        genres = cats["genre"][: self.max_genres]
        # "voice" reads as "vocals"; vocal instruments go first so the instrument limit never hides them.
        instruments = ["vocals" if i.lower() == "voice" else i for i in cats["instrument"]]
        vocal = [i for i in instruments if mentions_vocals(i)]
        instruments = vocal + [i for i in instruments if i not in vocal][: max(self.max_instruments - len(vocal), 0)]
        moods = cats["mood/theme"][: self.max_moods]
        if not (genres or instruments or moods):
            return "A piece of music."

        h = hashlib.sha256(track.track_id.encode()).digest()
        noun = _NOUNS[h[0] % len(_NOUNS)]
        head = f"{_join(genres)} {noun}" if genres else noun
        text = f"{_article(head)} {head}"
        if instruments:
            text += " " + _INSTRUMENT_CLAUSES[h[1] % len(_INSTRUMENT_CLAUSES)].format(_join(instruments))
        if moods:
            mood = _join(moods)
            clause = _MOOD_CLAUSES[h[2] % len(_MOOD_CLAUSES)].format(a=_article(mood).lower(), m=mood)
            text += (", " if instruments else " ") + clause
        return text + "."


class FileCaptioner:
    """Captions made elsewhere, looked up by (track id, clip start) from a CSV, TSV or JSONL file.

    Columns (CSV/TSV header) or keys (one JSON object per line): `track_id` (214 or track_0000214), `caption`,
    and optionally `clip_start` (seconds into the track). A row without a clip_start (column absent, empty
    cell, JSON null) is a track-level caption, used for any clip of the track that has no clip-level caption of
    its own; a clip-level caption matches the clip starting within CLIP_START_TOLERANCE s of it. A track that
    has neither gets None. Rows with an empty caption are ignored.

    Raises at construction, naming the file and line, for a missing file, a missing column/key, an unreadable
    track id or clip_start, or two different captions for one (track, clip_start) key.
    """

    needs_audio = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            rows = self._read_table("\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ValueError(f"caption file must be .csv, .tsv or .jsonl, got {self.path.name}")
        self.track_captions: dict[str, str] = {}
        self.clip_captions: dict[str, list[tuple[float, str]]] = {}
        for line, raw_id, raw_start, caption in rows:
            try:
                track_id = normalize_track_id(raw_id)
            except ValueError:
                raise ValueError(f"{self.path} line {line}: unreadable track_id {raw_id!r}") from None
            start = self._clip_start(line, raw_start)
            caption = str(caption).strip() if caption is not None else ""
            if not caption:
                continue
            if start is None:
                previous = self.track_captions.setdefault(track_id, caption)
            else:
                clips = self.clip_captions.setdefault(track_id, [])
                previous = self._match(clips, start)
                if previous is None:
                    clips.append((start, caption))
                    previous = caption
            if previous != caption:
                where = f"{track_id}" if start is None else f"{track_id} at clip_start {start:g} s"
                raise ValueError(f"{self.path} line {line}: second, different caption for {where}")

    def _clip_start(self, line: int, raw: Any) -> float | None:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        try:
            if isinstance(raw, bool):
                raise ValueError
            start = float(raw)
        except (TypeError, ValueError):
            start = math.nan
        if not math.isfinite(start) or start < 0:
            raise ValueError(f"{self.path} line {line}: clip_start must be seconds >= 0 or empty, got {raw!r}")
        return start

    @staticmethod
    def _match(clips: list[tuple[float, str]], start: float) -> str | None:
        for s, caption in clips:
            if abs(s - start) <= CLIP_START_TOLERANCE:
                return caption
        return None

    def _read_table(self, delimiter: str) -> list[tuple[int, Any, Any, Any]]:
        with self.path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("track_id", "caption") if c not in columns]
            if missing:
                raise ValueError(f"{self.path} lacks column(s) {missing} (columns: {', '.join(columns) or 'none'})")
            reader.fieldnames = columns
            return [(reader.line_num, row["track_id"], row.get("clip_start"), row["caption"]) for row in reader]

    def _read_jsonl(self) -> list[tuple[int, Any, Any, Any]]:
        rows = []
        with self.path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path} line {n}: not JSON ({e})") from None
                if not isinstance(obj, dict) or "track_id" not in obj or "caption" not in obj:
                    raise ValueError(f"{self.path} line {n}: expected an object with 'track_id' and 'caption'")
                rows.append((n, obj["track_id"], obj.get("clip_start"), obj["caption"]))
        return rows

    def __len__(self) -> int:
        """How many captions: track-level and clip-level."""
        return len(self.track_captions) + sum(len(c) for c in self.clip_captions.values())

    def __call__(
        self, track: Track, clip: np.ndarray | None = None, sr: int | None = None, clip_start: float | None = None
    ) -> str | None:
        track_id = normalize_track_id(track.track_id)
        if clip_start is not None:
            caption = self._match(self.clip_captions.get(track_id, []), float(clip_start))
            if caption is not None:
                return caption
        return self.track_captions.get(track_id)


def resolve_local_model(path_or_id: str, setting: str) -> Path:
    """A local directory for a model: the path itself, or the hub cache's snapshot. Never downloads."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download  # here: slow to import, and only the model captioner needs it

        return Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception as e:  # not cached, or not even a valid hub id (e.g. a mistyped local path)
        raise FileNotFoundError(
            f"caption model {path_or_id!r} is neither a local directory nor in the Hugging Face cache "
            f"(no download is attempted). Set {setting} to a local model directory, or use another captioner "
            f"kind ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


CaptionerKind = Literal["tags", "file", "model"]
_KINDS: dict[str, type] = {"tags": TagCaptioner, "file": FileCaptioner}


def build_captioner(kind: CaptionerKind, **kwargs: Any) -> Captioner | None:
    """Make an in-process captioner by name: "tags" -> TagCaptioner(**kwargs), "file" -> FileCaptioner(path=...).
    "model" -> None: model captions are pipeline stages of their own (`pipelines.preprocess.captioning`)."""
    if kind == "model":
        return None
    if kind not in _KINDS:
        raise ValueError(f"unknown captioner kind {kind!r}; valid kinds: {', '.join([*_KINDS, 'model'])}")
    return _KINDS[kind](**kwargs)
