"""MTG-Jamendo metadata: the track TSV, track ids, split files, Song Describer exclusions and tag categories.

Everything here is plain Python, called per file (metadata) or per row (exclusion) by the Ray Data
preprocessing pipeline. A bad row never raises: it comes back as a `Reject` so that the pipeline can
write it to `rejects/*.parquet` (nothing is dropped silently).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# Stage names, in pipeline order; a Reject's `stage` is one of them.
STAGES = ("metadata", "exclusion", "decode", "clip", "separation", "silence", "caption", "vocal_filter")

TAG_CATEGORIES = ("genre", "instrument", "mood/theme")
TAG_SEPARATOR = "---"

_TRACK_ID = re.compile(r"(?:track_)?(\d+)")
_TRACK_ID_DIGITS = 7


@dataclass(frozen=True)
class Reject:
    """Why a track (or a clip of it) left the pipeline: `stage` is one of STAGES, `reason` is for humans."""

    track_id: str
    stage: str
    reason: str


@dataclass
class Track:
    """One row of the Jamendo metadata TSV. `path` is relative to the audio root (e.g. "14/214.mp3")."""

    track_id: str
    artist_id: str
    album_id: str
    path: str
    duration: float
    tags: list[str] = field(default_factory=list)


def normalize_track_id(x: str | int) -> str:
    """ "214", 214 and "track_0000214" all become "track_0000214". Raises ValueError for anything else."""
    if isinstance(x, bool):  # bool is an int; True is not a track id
        raise ValueError(f"not a Jamendo track id: {x!r}")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"not a Jamendo track id: {x!r}")
        return f"track_{x:0{_TRACK_ID_DIGITS}d}"
    if isinstance(x, str):
        m = _TRACK_ID.fullmatch(x.strip())
        if m:
            return f"track_{int(m.group(1)):0{_TRACK_ID_DIGITS}d}"
    raise ValueError(f"not a Jamendo track id: {x!r}")


def read_metadata(tsv_path: str | Path) -> tuple[list[Track], list[Reject]]:
    """Parse a Jamendo metadata TSV (e.g. `raw_30s_cleantags_50artists.tsv`).

    Each row is TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, then any number of tag fields
    (`genre---rock`, ...). The header line is skipped when present; blank lines are ignored. A malformed
    row becomes a Reject(stage="metadata") whose reason names its 1-based line number; its track_id is the
    normalized id when the first field is readable, else `line:<n>`. A repeated track id is rejected too,
    so that each track is processed once. Raises FileNotFoundError only when the TSV itself is missing.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"Jamendo metadata TSV not found: {tsv_path}")
    tracks: list[Track] = []
    rejects: list[Reject] = []
    seen: set[str] = set()
    with tsv_path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if n == 1 and line.startswith("TRACK_ID"):
                continue
            track, reject = _parse_row(line, n)
            if track is not None and track.track_id in seen:  # keyed by line: the track itself is processed once
                track, reject = None, Reject(f"line:{n}", "metadata", f"line {n}: duplicate track id {track.track_id}")
            if reject is not None:
                rejects.append(reject)
            else:
                seen.add(track.track_id)
                tracks.append(track)
    return tracks, rejects


def _parse_row(line: str, n: int) -> tuple[Track | None, Reject | None]:
    fields = [x.strip() for x in line.split("\t")]
    try:
        track_id = normalize_track_id(fields[0])
    except ValueError:
        return None, Reject(f"line:{n}", "metadata", f"line {n}: unreadable track id {fields[0]!r}")

    def bad(why: str) -> tuple[None, Reject]:
        return None, Reject(track_id, "metadata", f"line {n}: {why}")

    if len(fields) < 5:
        return bad(f"expected at least 5 tab-separated fields, got {len(fields)}")
    _, artist_id, album_id, path, duration_text, *tags = fields
    for name, value in (("artist id", artist_id), ("album id", album_id), ("path", path)):
        if not value:
            return bad(f"empty {name}")
    try:
        duration = float(duration_text)
    except ValueError:
        return bad(f"duration is not a number: {duration_text!r}")
    if not math.isfinite(duration) or duration < 0:
        return bad(f"invalid duration {duration_text!r}")
    return Track(track_id, artist_id, album_id, path, duration, [t for t in tags if t]), None


def read_excluded_ids(csv_path: str | Path) -> set[str]:
    """Normalized track ids from a Song Describer Dataset CSV (its `track_id` column holds Jamendo ids).

    Tracks that appear in SDD are held out of training so that SDD can serve as an unseen test set.
    Rows with an empty `track_id` are skipped; an unreadable id raises ValueError naming its line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Song Describer CSV not found: {csv_path}")
    with csv_path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "track_id" not in columns:
            raise ValueError(f"{csv_path} has no 'track_id' column (columns: {', '.join(columns) or 'none'})")
        reader.fieldnames = columns
        ids = set()
        for row in reader:
            value = (row.get("track_id") or "").strip()
            if value:
                ids.add(_listed_id(value, f"{csv_path} line {reader.line_num}: unreadable track_id"))
    return ids


def read_split_ids(tsv_path: str | Path) -> set[str]:
    """Normalized track ids of an MTG-Jamendo split file (e.g. `splits/split-0/autotagging-validation.tsv`).

    The split files have the metadata TSV's layout (header `TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS`, then
    one tab-separated row per track); only the first field is read, so a plain list of ids, one per line, works
    too. Blank lines are skipped; an unreadable id raises ValueError naming its line.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"split file not found: {tsv_path}")
    ids = set()
    with tsv_path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for n, line in enumerate(f, start=1):
            first = line.rstrip("\r\n").split("\t", 1)[0].strip()
            if first and not (n == 1 and first == "TRACK_ID"):
                ids.add(_listed_id(first, f"{tsv_path} line {n}: unreadable track id"))
    return ids


def _listed_id(value: str, error: str) -> str:
    """`normalize_track_id(value)`; a ValueError `error value` (which names the file and line) when unreadable."""
    try:
        return normalize_track_id(value)
    except ValueError:
        raise ValueError(f"{error} {value!r}") from None


def exclusion_reject(track: Track, excluded: set[str]) -> Reject | None:
    """Reject(stage="exclusion") when the track is in the held-out set (e.g. Song Describer), else None."""
    if track.track_id in excluded:
        return Reject(track.track_id, "exclusion", "track is in the Song Describer Dataset (held out)")
    return None


def audio_path(audio_root: str | Path, track: Track) -> Path:
    """Where the track's audio lives: the TSV's PATH (e.g. "14/214.mp3") under the audio root."""
    return Path(audio_root) / track.path


# Jamendo writes multi-word tags as one word; captions read better with the spaces back.
_READABLE = {
    "acousticbassguitar": "acoustic bass guitar",
    "acousticguitar": "acoustic guitar",
    "alternativerock": "alternative rock",
    "classicalguitar": "classical guitar",
    "darkambient": "dark ambient",
    "deephouse": "deep house",
    "doublebass": "double bass",
    "drummachine": "drum machine",
    "drumnbass": "drum and bass",
    "easylistening": "easy listening",
    "electricguitar": "electric guitar",
    "electricpiano": "electric piano",
    "electronicorgan": "electronic organ",
    "hiphop": "hip hop",
    "newage": "new age",
    "pipeorgan": "pipe organ",
    "popfolk": "pop folk",
    "poprock": "pop rock",
    "rnb": "R&B",
    "rocknroll": "rock and roll",
    "singersongwriter": "singer-songwriter",
    "synthpop": "synth pop",
    "triphop": "trip hop",
}


def readable_tag(value: str) -> str:
    """ "acousticguitar" -> "acoustic guitar"; unknown values only get underscores turned into spaces."""
    value = value.strip()
    return _READABLE.get(value.lower(), value.replace("_", " "))


def tags_by_category(tags: list[str]) -> dict[str, list[str]]:
    """Group `category---value` tags into {"genre": [...], "instrument": [...], "mood/theme": [...]}.

    Values are readable (prefix stripped, compound words split), in input order, without duplicates. The
    three standard categories are always present; any other category gets its own key and a tag without
    a category goes under "other".
    """
    out: dict[str, list[str]] = {c: [] for c in TAG_CATEGORIES}
    for tag in tags:
        category, sep, value = tag.strip().partition(TAG_SEPARATOR)
        if not sep:
            category, value = "other", category
        value = readable_tag(value)
        if not value:
            continue
        values = out.setdefault(category.strip(), [])
        if value not in values:
            values.append(value)
    return out
