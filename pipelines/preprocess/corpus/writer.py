"""The synthetic corpus in the MTG-Jamendo layout: metadata text, captions, corpus.json and the audio files.

`make_corpus(out_dir, n_tracks)` plans the tracks (`tracks.plan_corpus`), writes each track's file as its
kind asks (music, or one of the bad inputs), and the text files the preprocessing pipeline reads from the
real dataset. The package docstring lists the files and the kinds of track.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from pipelines.paths import folder_problem
from pipelines.preprocess.corpus.synth import SR
from pipelines.preprocess.corpus.tracks import (
    BAD_KINDS,
    GOOD_KINDS,
    WINDOW_SECONDS,
    TrackSpec,
    plan_corpus,
    synthesize,
)

TSV_NAME = "raw_30s_cleantags_50artists.tsv"
SDD_NAME = "song_describer.csv"
CAPTIONS_NAME = "captions.jsonl"
CLIP_VARIANTS = 10  # caption variant of a track's first clip in captions.jsonl (then 11, 12, ...)
MANIFEST_NAME = "corpus.json"
AUDIO_DIR = "audio"
TSV_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
# The Song Describer Dataset's song_describer.csv columns
SDD_HEADER = tuple("caption_id track_id caption is_valid_subset familiarity artist_id album_id path duration".split())

# -------------------------------------------------------------------------------------------- metadata text

_INSTRUMENT_WORDS = {
    "synthesizer": "synthesizers",
    "bass": "bass",
    "drums": "drums",
    "piano": "piano",
    "strings": "strings",
    "electricpiano": "electric piano",
    "voice": "vocals",
}
_MOOD_WORDS = {"dream": "dreamy"}


def caption(spec: TrackSpec, variant: int = 0) -> str:
    """A sentence saying what was synthesized. Only tracks with a voice mention vocals; `variant` varies
    the wording (SDD rows use variants 1 and 2, captions.jsonl variant 0 per track, CLIP_VARIANTS + i per clip i)."""
    rng = np.random.default_rng([spec.seed, variant])
    words = [_INSTRUMENT_WORDS[i] for i in spec.instruments]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    mood = " and ".join(_MOOD_WORDS.get(m, m) for m in spec.moods)
    speed = "slow" if spec.tempo < 85 else "fast" if spec.tempo >= 120 else "mid-tempo"
    article = "An" if mood[0] in "aeiou" else "A"
    templates = (
        f"{article} {mood} {spec.genre} piece in {spec.key} at {spec.tempo:.0f} BPM with {listed}.",
        f"{speed.capitalize()} {spec.genre} track featuring {listed}; the mood is {mood}.",
        f"{mood.capitalize()} {speed} {spec.genre} music in {spec.key}, played on {listed}.",
    )
    text = templates[int(rng.integers(len(templates)))]
    if not spec.voice:
        text = text[:-1] + ", instrumental."
    return text


def tsv_line(spec: TrackSpec) -> str:
    """One metadata row (no newline): five fixed fields then one field per tag. A `malformed` track drops
    its ALBUM_ID and its DURATION is the word "unknown": four fields in all."""
    if spec.kind == "malformed":
        return "\t".join((spec.track_id, spec.artist_id, spec.path, "unknown"))
    return "\t".join((spec.track_id, spec.artist_id, spec.album_id, spec.path, f"{spec.seconds:.1f}", *spec.tags))


def tsv_text(specs: list[TrackSpec]) -> str:
    return "\t".join(TSV_HEADER) + "\n" + "".join(tsv_line(s) + "\n" for s in specs)


def sdd_csv_text(specs: list[TrackSpec]) -> str:
    """Song Describer rows, one or two captions per `sdd` track, in SDD's columns (SDD_HEADER): integer track,
    artist and album ids as SDD has them, and `path` relative to the corpus audio folder (the track's own file;
    SDD's are 2-minute excerpts named NN/ID.2min.mp3). One caption in three is outside the validated subset."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SDD_HEADER)
    caption_id = 0
    for spec in specs:
        if spec.kind != "sdd":
            continue
        for variant in range(1, 2 + spec.seed % 2):
            valid, familiarity = caption_id % 3 != 2, (spec.seed + variant) % 6  # SDD rates familiarity 0-5
            text = caption(spec, variant)
            writer.writerow(
                (caption_id, spec.number, text, valid, familiarity, spec.artist, spec.album, spec.path, spec.seconds)
            )
            caption_id += 1
    return buf.getvalue()


def clip_starts(spec: TrackSpec) -> list[float]:
    """Starts (s) of the track's full 30 s clips, as the pipeline cuts them."""
    return [i * WINDOW_SECONDS for i in range(int(spec.seconds // WINDOW_SECONDS))]


def captions_text(specs: list[TrackSpec]) -> str:
    """captions.jsonl: for every track of the TSV except the `no_caption` one, a track-level caption (no clip_start)
    and one caption per full 30 s clip (the same facts, worded per clip), which wins for that clip."""
    lines = []
    for s in specs:
        if s.kind == "no_caption":
            continue
        lines.append(json.dumps({"track_id": s.track_id, "caption": caption(s)}) + "\n")
        for i, start in enumerate(clip_starts(s)):
            obj = {"track_id": s.track_id, "clip_start": start, "caption": caption(s, CLIP_VARIANTS + i)}
            lines.append(json.dumps(obj) + "\n")
    return "".join(lines)


# ---------------------------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class CorpusTrack:
    """One row of corpus.json: what the track is, and so what the pipeline should do with it."""

    track_id: str
    kind: str
    path: str  # the TSV's PATH, relative to the audio folder
    duration: float  # seconds: the TSV's DURATION (`malformed` has none there) and, when rendered, the audio's length
    genre: str
    tempo: float
    key: str
    tags: tuple[str, ...]
    caption: str | None  # the captions.jsonl caption; None for `no_caption`
    voice: bool
    silences: tuple[tuple[float, float], ...] = field(default=())


@dataclass
class CorpusManifest:
    """A generated corpus: its folder, the files in it and every track's kind (sorted by track id)."""

    root: Path
    seed: int
    tracks: list[CorpusTrack]

    @property
    def tsv_path(self) -> Path:
        return self.root / TSV_NAME

    @property
    def sdd_csv_path(self) -> Path:
        return self.root / SDD_NAME

    @property
    def captions_path(self) -> Path:
        return self.root / CAPTIONS_NAME

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def audio_dir(self) -> Path:
        return self.root / AUDIO_DIR

    @property
    def kinds(self) -> dict[str, str]:
        """track id -> kind."""
        return {t.track_id: t.kind for t in self.tracks}

    def ids(self, *kinds: str) -> list[str]:
        """Track ids of the given kinds (all tracks when none are given)."""
        return [t.track_id for t in self.tracks if not kinds or t.kind in kinds]

    def track(self, track_id: str) -> CorpusTrack:
        for t in self.tracks:
            if t.track_id == track_id:
                return t
        raise KeyError(track_id)

    def audio_path(self, track_id: str) -> Path:
        return self.audio_dir / self.track(track_id).path

    def to_json(self) -> str:
        files = {"tsv": TSV_NAME, "sdd_csv": SDD_NAME, "captions": CAPTIONS_NAME, "audio_dir": AUDIO_DIR}
        body = {"seed": self.seed, "sample_rate": SR, "files": files, "tracks": [asdict(t) for t in self.tracks]}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def load(cls, root: str | Path) -> CorpusManifest:
        """Read `root/corpus.json` back."""
        root = Path(root)
        body = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        tracks = []
        for t in body["tracks"]:
            t = {**t, "tags": tuple(t["tags"]), "silences": tuple(tuple(s) for s in t["silences"])}
            tracks.append(CorpusTrack(**t))
        return cls(root, body["seed"], tracks)


def _track_entry(spec: TrackSpec) -> CorpusTrack:
    return CorpusTrack(
        track_id=spec.track_id,
        kind=spec.kind,
        path=spec.path,
        duration=spec.seconds,
        genre=spec.genre,
        tempo=spec.tempo,
        key=spec.key,
        tags=spec.tags,
        caption=None if spec.kind == "no_caption" else caption(spec),
        voice=spec.voice,
        silences=spec.silences,
    )


# ---------------------------------------------------------------------------------------------- make_corpus


def write_track(spec: TrackSpec, audio_dir: Path) -> None:
    """Write one track's file under audio_dir as its kind asks (a `missing` track's file is removed)."""
    path = audio_dir / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.kind == "missing":
        path.unlink(missing_ok=True)
    elif spec.kind == "empty":
        path.write_bytes(b"")
    elif spec.kind == "corrupt":
        # No 0xFF byte, so no MPEG frame sync word: a decoder cannot resynchronise on chance bytes.
        junk = np.random.default_rng(spec.seed).integers(0, 255, size=16384, dtype=np.uint8)
        path.write_bytes(junk.tobytes())
    elif spec.kind == "nonfinite":
        sf.write(path, synthesize(spec), SR, format="WAV", subtype="FLOAT")
    else:
        sf.write(path, synthesize(spec), SR, format="MP3")


class CorpusExistsError(FileExistsError):
    """The output folder already holds a corpus: files of the same name would be overwritten and the others left,
    and preprocessing would read a mix of the two corpora."""


def check_corpus_folder(root: Path) -> None:
    """Refuse a folder that holds a corpus (its metadata TSV or corpus.json; CorpusExistsError) or a path that is,
    or lies under, a file (NotADirectoryError)."""
    problem = folder_problem(root)
    if problem:
        raise NotADirectoryError(f"{root} {problem}")
    marks = [root / name for name in (TSV_NAME, MANIFEST_NAME) if (root / name).is_file()]
    if not marks:
        return
    try:
        if marks[0].name == TSV_NAME:  # one row per track after the header
            lines = marks[0].read_text(encoding="utf-8", errors="replace").splitlines()[1:]
            count = f" of {sum(1 for line in lines if line.strip())} tracks"
        else:
            count = f" of {len(json.loads(marks[0].read_text(encoding='utf-8'))['tracks'])} tracks"
    except (ValueError, KeyError, TypeError):  # unreadable: still a corpus
        count = ""
    raise CorpusExistsError(
        f"{root} already holds a corpus{count} ({', '.join(m.name for m in marks)}); a new one written into it would "
        "mix with its files: delete the folder, or choose another folder"
    )


def make_corpus(
    out_dir: str | Path,
    n_tracks: int,
    *,
    bad: bool = False,
    seed: int = 0,
    min_seconds: float = 60.0,
    max_seconds: float = 100.0,
    progress: bool = True,
    workers: int = 1,
    sdd_tracks: int | None = None,
) -> CorpusManifest:
    """Write a corpus of n_tracks music tracks (+ one of each bad input with bad=True) under out_dir.

    Durations are drawn from [min_seconds, max_seconds] (min_seconds >= 30, so that every music track has
    a full clip). A folder that already holds a corpus is refused (CorpusExistsError, before anything is written):
    its files would be overwritten or left, a mix of two corpora. Returns the manifest
    that is also written to out_dir/corpus.json. With workers > 1, tracks are rendered and encoded in that
    many spawned processes (MP3 encoding dominates; the files do not depend on the number of workers).
    `sdd_tracks`: how many tracks are Song Describer ones (held out of training, the eval set's audio);
    None: about 10%.
    """
    root = Path(out_dir)
    check_corpus_folder(root)
    specs = plan_corpus(
        n_tracks, bad=bad, seed=seed, min_seconds=min_seconds, max_seconds=max_seconds, sdd_tracks=sdd_tracks
    )
    audio_dir = root / AUDIO_DIR
    audio_dir.mkdir(parents=True, exist_ok=True)
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        done = pool.map(write_track, specs, [audio_dir] * len(specs))
    else:
        done = (write_track(spec, audio_dir) for spec in specs)
    try:
        for i, (spec, _) in enumerate(zip(specs, done, strict=True), start=1):
            if progress:
                print(
                    f"make-corpus [{i}/{len(specs)}] {spec.track_id} {spec.kind:<10} {spec.seconds:5.1f} s  "
                    f"{spec.genre} {spec.tempo:.0f} BPM {spec.key}",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    (root / TSV_NAME).write_text(tsv_text(specs), encoding="utf-8", newline="\n")
    (root / SDD_NAME).write_text(sdd_csv_text(specs), encoding="utf-8", newline="\n")
    (root / CAPTIONS_NAME).write_text(captions_text(specs), encoding="utf-8", newline="\n")
    manifest = CorpusManifest(root, seed, [_track_entry(s) for s in specs])
    manifest.manifest_path.write_text(manifest.to_json(), encoding="utf-8", newline="\n")
    if progress:
        counts = {k: len(manifest.ids(k)) for k in GOOD_KINDS + BAD_KINDS if manifest.ids(k)}
        print(f"make-corpus: wrote {len(specs)} tracks to {root} ({', '.join(f'{k} {c}' for k, c in counts.items())})")
    return manifest
