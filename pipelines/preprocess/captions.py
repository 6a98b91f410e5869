"""Captioners: text for a clip, from Jamendo tags, from a file of captions, or from a local audio-to-text model.

All share one interface, `Captioner.__call__(track, clip, sr) -> str | None`; None means no caption is
available and the pipeline rejects the clip with stage "caption" (`caption_or_reject` does that, and also
turns a captioner's exception into a Reject). `build_captioner` is the one place that picks one by name.

The paper captions with LP-MusicCaps rephrased by LLaMA-3; neither runs offline here, so the default is
`TagCaptioner`, and paper-style captions computed elsewhere come in through `FileCaptioner`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipelines.preprocess.filters import mentions_vocals
from pipelines.preprocess.jamendo import Reject, Track, normalize_track_id, tags_by_category


class Captioner(Protocol):
    def __call__(self, track: Track, clip: np.ndarray, sr: int) -> str | None:
        """Caption for one clip (T,) of `track` at sample rate sr, or None when there is none."""
        ...


def caption_or_reject(
    captioner: Captioner, track: Track, clip_start: float, clip: np.ndarray, sr: int
) -> tuple[str | None, Reject | None]:
    """Run a captioner on one clip; (caption, None), or (None, Reject(stage="caption")). Never raises."""
    name = type(captioner).__name__
    try:
        caption = captioner(track, clip, sr)
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

    def __call__(self, track: Track, clip: np.ndarray | None = None, sr: int | None = None) -> str:
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
    """Captions looked up by track id from a CSV (columns track_id, caption) or JSONL file
    (one {"track_id": ..., "caption": ...} object per line). Track ids may be written as 214 or
    track_0000214. A track that is not in the file gets None.

    Raises at construction for a missing file, a missing column/key, an unreadable id, or one track id
    with two different captions.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            rows = self._read_csv()
        elif suffix in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ValueError(f"caption file must be .csv or .jsonl, got {self.path.name}")
        self.captions: dict[str, str] = {}
        for line, raw_id, caption in rows:
            try:
                track_id = normalize_track_id(raw_id)
            except ValueError:
                raise ValueError(f"{self.path} line {line}: unreadable track_id {raw_id!r}") from None
            caption = str(caption).strip() if caption is not None else ""
            if not caption:
                continue
            previous = self.captions.setdefault(track_id, caption)
            if previous != caption:
                raise ValueError(f"{self.path} line {line}: second, different caption for {track_id}")

    def _read_csv(self) -> list[tuple[int, Any, Any]]:
        with self.path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("track_id", "caption") if c not in columns]
            if missing:
                raise ValueError(f"{self.path} lacks column(s) {missing} (columns: {', '.join(columns) or 'none'})")
            reader.fieldnames = columns
            return [(reader.line_num, row["track_id"], row["caption"]) for row in reader]

    def _read_jsonl(self) -> list[tuple[int, Any, Any]]:
        rows = []
        with self.path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path} line {n}: not JSON ({e})") from None
                if not isinstance(obj, dict) or "track_id" not in obj or "caption" not in obj:
                    raise ValueError(f"{self.path} line {n}: expected an object with 'track_id' and 'caption'")
                rows.append((n, obj["track_id"], obj["caption"]))
        return rows

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, track: Track, clip: np.ndarray | None = None, sr: int | None = None) -> str | None:
        return self.captions.get(normalize_track_id(track.track_id))


class ModelCaptioner:
    """Captions from a local Hugging Face audio-to-text model, through a transformers `pipeline`.

    `path_or_id` is a local directory or a hub id already in the local cache: nothing is downloaded. When
    neither exists, construction raises FileNotFoundError naming `setting` (the config key to change).
    The pipeline gets {"raw": clip (T,), "sampling_rate": sr} and returns {"text": ...}, which is what
    transformers' audio-to-text pipelines ("automatic-speech-recognition", the default `task`) share.

    Only the missing-model error is tested: there is no tiny audio-captioning model that can be built
    offline in a test, and the default captioner (tags) and file captions cover the pipeline.
    """

    def __init__(
        self,
        path_or_id: str | Path,
        device: str = "cpu",
        max_new_tokens: int = 64,
        setting: str = "data.caption_model",
        task: str = "automatic-speech-recognition",
    ):
        self.max_new_tokens = max_new_tokens
        local = _resolve_local_model(str(path_or_id), setting)
        from transformers import pipeline  # imported here: slow, and only this captioner needs it

        self.pipe = pipeline(task, model=str(local), device=device, model_kwargs={"local_files_only": True})

    def __call__(self, track: Track, clip: np.ndarray, sr: int) -> str | None:
        out = self.pipe(
            {"raw": np.asarray(clip, dtype=np.float32), "sampling_rate": sr},
            generate_kwargs={"max_new_tokens": self.max_new_tokens},
        )
        if isinstance(out, list):
            out = out[0] if out else {}
        text = out.get("text") if isinstance(out, dict) else out
        if not isinstance(text, str):
            return None
        return text.strip() or None


def _resolve_local_model(path_or_id: str, setting: str) -> Path:
    """A local directory for the model: the path itself, or the hub cache's snapshot. Never downloads."""
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
_KINDS: dict[str, type] = {"tags": TagCaptioner, "file": FileCaptioner, "model": ModelCaptioner}


def build_captioner(kind: CaptionerKind, **kwargs: Any) -> Captioner:
    """Make a captioner by name: "tags" -> TagCaptioner(**kwargs), "file" -> FileCaptioner(path=...),
    "model" -> ModelCaptioner(path_or_id=..., ...)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown captioner kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    return _KINDS[kind](**kwargs)
