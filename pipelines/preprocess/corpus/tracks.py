"""What a track of the synthetic corpus is: its kind, its genre's style, its seeded plan and its audio.

`plan_corpus` draws every track's musical parameters (`TrackSpec`) from one seeded RNG; `render_stems`
arranges a spec into parts with the instruments of `synth`, and `synthesize` mixes them into the samples of
the track's audio file (silences and non-finite samples included, as its kind asks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.preprocess.corpus.synth import (
    DRUM_PATTERNS,
    NOTE_NAMES,
    PROGRESSIONS,
    SR,
    VOWELS,
    Note,
    add_at,
    chord_pitches,
    degree_pitch,
    drum_kit,
    render_notes,
    sing,
)

WINDOW_SECONDS = 30.0  # the pipeline's clip length: silences and the "short" track are placed against it
SHORT_SECONDS = 12.0

GOOD_KINDS = ("good", "vocals", "silence", "sdd")
BAD_KINDS = ("corrupt", "empty", "missing", "nonfinite", "short", "malformed", "no_caption")
# Share of the n_tracks given each special kind (at least one each while a good track is left over).
KIND_SHARES = (("sdd", 0.10), ("vocals", 0.25), ("silence", 0.20))
_UNRENDERED = ("corrupt", "empty", "missing")  # kinds whose file holds no music

# -------------------------------------------------------------------------------------------- styles and plans


@dataclass(frozen=True)
class Style:
    """How a genre is arranged: which generator and instrument plays each part, and the tags they earn."""

    tempo: tuple[int, int]  # BPM range
    major_share: float  # chance of a major key
    drums: str | None  # DRUM_PATTERNS key
    bass: str  # "offbeat", "root8", "walk", "drone"
    chords: str  # "block", "stabs", "arp"
    chord_instrument: str
    melody_instrument: str
    melody_density: float  # notes per beat, roughly
    sevenths: bool
    bars_per_chord: int
    instruments: tuple[str, ...]  # Jamendo instrument tags for the above


STYLES = {
    "electronic": Style((118, 132), 0.5, "four", "offbeat", "block", "pad", "fm_lead", 1.0, False, 1,
                        ("synthesizer", "bass", "drums")),
    "techno": Style((124, 138), 0.15, "four", "offbeat", "arp", "synth_pluck", "synth_pluck", 1.5, False, 2,
                    ("synthesizer", "drums", "bass")),
    "ambient": Style((60, 80), 0.5, None, "drone", "block", "pad", "fm_bell", 0.4, True, 2, ("synthesizer",)),
    "pop": Style((92, 124), 0.75, "backbeat", "root8", "stabs", "piano", "fm_lead", 1.0, False, 1,
                 ("piano", "bass", "drums", "synthesizer")),
    "classical": Style((66, 104), 0.5, None, "drone", "arp", "piano", "strings", 0.7, False, 1,
                       ("piano", "strings")),
    "chillout": Style((78, 100), 0.5, "soft", "walk", "stabs", "epiano", "fm_bell", 0.6, True, 1,
                      ("electricpiano", "bass", "drums")),
}  # fmt: skip


def _moods(rng: np.random.Generator, genre: str, mode: str, tempo: float) -> tuple[str, ...]:
    if genre == "ambient":
        pool = ["calm", "relaxing", "dream"] + (["dark"] if mode == "minor" else [])
    elif genre == "chillout":
        pool = ["relaxing", "calm"] + (["romantic"] if mode == "major" else ["melancholic"])
    elif mode == "major":
        pool = ["happy", "energetic", "uplifting"] if tempo >= 110 else ["happy", "uplifting", "calm", "romantic"]
    else:
        pool = ["dark", "energetic", "epic"] if tempo >= 110 else ["sad", "melancholic", "dark", "calm"]
    k = int(rng.integers(1, 3))
    return tuple(str(m) for m in rng.choice(pool, size=k, replace=False))


@dataclass(frozen=True)
class TrackSpec:
    """Everything needed to render one track and write its metadata. `seed` drives notes and noise."""

    number: int  # Jamendo numeric id: track_0000214 has number 214
    artist: int
    album: int
    kind: str  # one of GOOD_KINDS or BAD_KINDS
    seconds: float  # the duration written to the TSV and (for rendered kinds) the audio length
    genre: str
    tempo: float  # BPM
    tonic: int  # MIDI pitch of the key's tonic, 48..59
    mode: str  # "major" or "minor"
    moods: tuple[str, ...]
    voice: bool
    silences: tuple[tuple[float, float], ...]  # (start s, end s) of digital silence
    seed: int

    @property
    def track_id(self) -> str:
        return f"track_{self.number:07d}"

    @property
    def artist_id(self) -> str:
        return f"artist_{self.artist:06d}"

    @property
    def album_id(self) -> str:
        return f"album_{self.album:06d}"

    @property
    def path(self) -> str:
        """The TSV's PATH, relative to the audio folder: NN/ID.mp3 with NN the id's last two digits."""
        ext = "wav" if self.kind == "nonfinite" else "mp3"
        return f"{self.number % 100:02d}/{self.number}.{ext}"

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.tonic % 12]} {self.mode}"

    @property
    def instruments(self) -> tuple[str, ...]:
        return STYLES[self.genre].instruments + (("voice",) if self.voice else ())

    @property
    def tags(self) -> tuple[str, ...]:
        return (
            (f"genre---{self.genre}",)
            + tuple(f"instrument---{i}" for i in self.instruments)
            + tuple(f"mood/theme---{m}" for m in self.moods)
        )

    @property
    def rendered(self) -> bool:
        return self.kind not in _UNRENDERED


def _draw_seconds(rng: np.random.Generator, lo: float, hi: float) -> float:
    # One decimal, as the real TSV has, rounded up so that a track never falls below `lo`.
    return math.ceil(round(rng.uniform(lo, hi) * 10, 6)) / 10


def plan_track(
    rng: np.random.Generator, number: int, artist: int, album: int, kind: str, min_seconds: float, max_seconds: float
) -> TrackSpec:
    """Draw one track's musical parameters (and, for `silence`, where the silence goes) from rng."""
    genre = str(rng.choice(list(STYLES)))
    style = STYLES[genre]
    tempo = float(rng.integers(style.tempo[0], style.tempo[1] + 1))
    mode = "major" if rng.random() < style.major_share else "minor"
    tonic = int(rng.integers(48, 60))
    moods = _moods(rng, genre, mode, tempo)
    seconds = SHORT_SECONDS if kind == "short" else _draw_seconds(rng, min_seconds, max_seconds)
    silences: tuple[tuple[float, float], ...] = ()
    if kind == "silence":
        window = int(rng.integers(0, int(seconds // WINDOW_SECONDS)))
        length = round(float(rng.uniform(20.0, 24.0)), 2)
        offset = round(float(rng.uniform(1.0, WINDOW_SECONDS - length - 1.0)), 2)
        start = window * WINDOW_SECONDS + offset
        silences = ((start, round(start + length, 2)),)
    seed = int(rng.integers(2**31))
    voice = kind == "vocals"
    return TrackSpec(number, artist, album, kind, seconds, genre, tempo, tonic, mode, moods, voice, silences, seed)


def plan_corpus(
    n_tracks: int,
    *,
    bad: bool = False,
    seed: int = 0,
    min_seconds: float = 60.0,
    max_seconds: float = 100.0,
    sdd_tracks: int | None = None,
) -> list[TrackSpec]:
    """Plan n_tracks music tracks (+ one of each BAD_KINDS with bad=True), sorted by track number.

    Kinds: about 10% sdd (or `sdd_tracks` of them: the eval set's tracks), 25% vocals and 20% silence, at least one
    of each while one `good` track is left.
    """
    if n_tracks < 1:
        raise ValueError(f"n_tracks must be at least 1, got {n_tracks}")
    if not WINDOW_SECONDS <= min_seconds <= max_seconds:
        raise ValueError(
            f"need {WINDOW_SECONDS} <= min_seconds <= max_seconds (one full clip per track), "
            f"got min_seconds={min_seconds}, max_seconds={max_seconds}"
        )
    rng = np.random.default_rng(seed)
    kinds: list[str] = []
    for kind, share in KIND_SHARES:
        wanted = sdd_tracks if kind == "sdd" and sdd_tracks is not None else max(1, round(share * n_tracks))
        count = min(wanted, n_tracks - 1 - len(kinds))
        kinds += [kind] * max(count, 0)
    kinds += ["good"] * (n_tracks - len(kinds))
    kinds = [kinds[i] for i in rng.permutation(n_tracks)]
    if bad:
        kinds += list(BAD_KINDS)
    numbers = 1 + rng.choice(1_400_000, size=len(kinds), replace=False)
    n_artists = max(2, math.ceil(len(kinds) / 3))
    artists = 1 + rng.choice(500_000, size=n_artists, replace=False)
    albums = 1 + rng.choice(500_000, size=(n_artists, 2), replace=False)  # two albums per artist
    specs = []
    for kind, number in zip(kinds, numbers, strict=True):
        a = int(rng.integers(n_artists))
        album = int(albums[a, rng.integers(2)])
        specs.append(plan_track(rng, int(number), int(artists[a]), album, kind, min_seconds, max_seconds))
    return sorted(specs, key=lambda s: s.number)


# ------------------------------------------------------------------------------------------------- rendering


def _melody(
    rng: np.random.Generator, spec: TrackSpec, chords: list[list[int]], lo: int, hi: int, density: float, legato: bool
) -> list[Note]:
    """A motif-based line: a two-bar rhythm + contour, restated over each pair of bars with the pitches pulled
    to the current chord on strong beats. Pitches stay within [lo, hi] MIDI."""
    beat = 60.0 / spec.tempo
    choices = np.array([0.5, 1.0, 1.5, 2.0]) if density >= 0.8 else np.array([1.0, 2.0, 3.0, 4.0])
    notes: list[Note] = []
    degree = 7 + int(rng.integers(-2, 3))
    motif: list[tuple[float, float, int]] = []  # (beat offset, beats, degree step)
    pos = 0.0
    while pos < 8.0:
        length = min(float(rng.choice(choices)), 8.0 - pos)
        motif.append((pos, length, int(rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]))))
        pos += length
    for pair in range(len(chords) // 2):
        if pair % 4 == 3:  # a new motif every four restatements keeps long tracks moving
            motif = [(p, b, int(rng.choice([-2, -1, 0, 1, 2]))) for p, b, _ in motif]
        for offset, beats, step in motif:
            if rng.random() < 0.12:
                continue  # a rest
            bar = 2 * pair + int(offset // 4)
            degree += step
            pitch = degree_pitch(spec.tonic, spec.mode, degree)
            if offset % 2 == 0:  # strong beat: nearest chord tone
                tones = [p + 12 * o for p in chords[bar] for o in range(-2, 4)]
                pitch = min(tones, key=lambda p: abs(p - pitch))
            while pitch > hi:
                pitch, degree = pitch - 12, degree - 7
            while pitch < lo:
                pitch, degree = pitch + 12, degree + 7
            start = (4 * 2 * pair + offset) * beat
            seconds = beats * beat * (0.98 if legato else 0.8)
            notes.append((start, seconds, float(pitch), float(rng.uniform(0.7, 1.0))))
    return notes


def render_stems(spec: TrackSpec) -> dict[str, np.ndarray]:
    """The parts of a track, each (n,) float64 at SR with n = round(seconds * SR), scaled to its mix level.

    Keys: "chords", "bass", "melody", and "drums" / "voice" when the style / spec has them. The arrangement
    is cut into four-bar sections; drums, bass and melody sit some sections out, and a voice answers the
    melody (it sings where the melody rests, and always in the second section).
    """
    if not spec.rendered:
        raise ValueError(f"{spec.track_id} is a {spec.kind!r} track: it has no audio to render")
    rng = np.random.default_rng(spec.seed)
    style = STYLES[spec.genre]
    n = int(round(spec.seconds * SR))
    beat = 60.0 / spec.tempo
    bar = 4 * beat
    n_bars = int(math.ceil(spec.seconds / bar)) + 1
    n_bars += n_bars % 2
    progression = PROGRESSIONS[spec.mode][int(rng.integers(len(PROGRESSIONS[spec.mode])))]
    roots = [progression[(b // style.bars_per_chord) % len(progression)] for b in range(n_bars)]
    chords = [chord_pitches(spec.tonic + 12, spec.mode, r, style.sevenths) for r in roots]  # around C4..B5
    n_sections = n_bars // 4 + 1
    active = {
        "drums": rng.random(n_sections) < 0.9,
        "bass": rng.random(n_sections) < 0.9,
        "melody": rng.random(n_sections) < 0.7,
        "voice": rng.random(n_sections) < 0.6,
    }
    active["drums"][0] = active["drums"][0] and rng.random() < 0.5  # half the tracks open without drums
    active["voice"][min(1, n_sections - 1)] = True
    if spec.voice:
        active["melody"] &= ~active["voice"]

    def section_of(start: float) -> int:
        return int(start // (4 * bar))

    stems: dict[str, np.ndarray] = {}

    chord_notes: list[Note] = []
    for b, chord in enumerate(chords):
        t = b * bar
        if style.chords == "block":
            if b % style.bars_per_chord == 0:
                chord_notes += [(t, style.bars_per_chord * bar, float(p), 0.6) for p in chord]
        elif style.chords == "stabs":
            for hit in (0.0, 1.5, 2.5) if spec.genre == "pop" else (0.0, 2.5):
                chord_notes += [(t + hit * beat, 0.9 * beat, float(p), 0.55) for p in chord]
        else:  # "arp": broken chord in eighths (sixteenths in techno), up and back down
            step = 0.25 if spec.genre == "techno" else 0.5
            cycle = chord + [chord[0] + 12] + chord[::-1][1:-1]
            for k in range(int(4 / step)):
                chord_notes.append((t + k * step * beat, step * beat * 1.5, float(cycle[k % len(cycle)]), 0.6))
    stems["chords"] = 0.35 * _normalized(render_notes(style.chord_instrument, chord_notes, n))

    bass_notes: list[Note] = []
    for b, chord in enumerate(chords):
        t = b * bar
        if not active["bass"][section_of(t)]:
            continue
        root = chord[0] - 24
        if style.bass == "drone":
            if b % style.bars_per_chord == 0:
                bass_notes.append((t, style.bars_per_chord * bar, float(root), 0.8))
        elif style.bass == "offbeat":
            bass_notes += [(t + (k + 0.5) * beat, 0.45 * beat, float(root), 0.9) for k in range(4)]
        elif style.bass == "root8":
            octave_jump = [0, 0, 0, 0, 0, 12, 0, 0]
            bass_notes += [(t + k * 0.5 * beat, 0.45 * beat, float(root + octave_jump[k]), 0.9) for k in range(8)]
        else:  # "walk": root, third, fifth, approach the next root from a semitone below
            nxt = chords[b + 1][0] - 24 if b + 1 < len(chords) else root
            walk = [root, chord[1] - 24, chord[2] - 24, nxt - 1]
            bass_notes += [(t + k * beat, 0.9 * beat, float(p), 0.85) for k, p in enumerate(walk)]
    bass_instrument = "strings" if spec.genre in ("classical", "ambient") else "fm_bass"
    stems["bass"] = 0.5 * _normalized(render_notes(bass_instrument, bass_notes, n))

    melody = _melody(rng, spec, chords, 67, 86, style.melody_density, legato=style.melody_instrument == "strings")
    melody = [m for m in melody if active["melody"][section_of(m[0])]]
    stems["melody"] = 0.4 * _normalized(render_notes(style.melody_instrument, melody, n))

    if style.drums is not None:
        kit = drum_kit(rng)
        drums = np.zeros(n)
        for b in range(n_bars):
            if not active["drums"][section_of(b * bar)]:
                continue
            pattern = dict(DRUM_PATTERNS[style.drums])
            if b % 4 == 3 and rng.random() < 0.5:  # a fill into the next section
                pattern["snare"] = (pattern["snare"][0] + (13, 14, 15), pattern["snare"][1])
            for piece, (steps, velocity) in pattern.items():
                for s in steps:
                    add_at(drums, b * bar + s * beat / 4, kit[piece] * velocity * rng.uniform(0.85, 1.0))
        stems["drums"] = 0.6 * _normalized(drums)

    if spec.voice:
        sung = _melody(rng, spec, chords, 57, 72, 0.5, legato=True)
        sung = [m for m in sung if active["voice"][section_of(m[0])]]
        vowels = [str(v) for v in rng.choice(list(VOWELS), size=max(len(sung), 1))]
        stems["voice"] = 0.55 * _normalized(sing(sung, vowels, n, seed=int(rng.integers(2**31))))
    return stems


def _normalized(x: np.ndarray) -> np.ndarray:
    peak = max(x.max(), -x.min()) if len(x) else 0.0
    return x / peak if peak > 0 else x


def synthesize(spec: TrackSpec) -> np.ndarray:
    """The audio file's samples: (n,) float32 at SR, mono, n = round(seconds * SR).

    The stems are summed, faded in/out and normalized to -1 dBFS peak; `spec.silences` are then zeroed
    (digital silence, with 10 ms fades into and out of it). A `nonfinite` track gets a 100 ms run of NaN and
    a few +-inf samples.
    """
    x = sum(render_stems(spec).values())
    n = len(x)
    x *= np.minimum(1.0, np.minimum(np.arange(n) / (0.3 * SR), (n - np.arange(n)) / (1.5 * SR)))
    x = 0.89 * _normalized(x)
    fade = int(0.01 * SR)
    for start, end in spec.silences:
        a, b = int(start * SR), min(int(end * SR), n)
        lo, hi = max(a - fade, 0), min(b + fade, n)
        x[lo:a] *= np.linspace(1, 0, fade)[fade - (a - lo) :]
        x[a:b] = 0.0
        x[b:hi] *= np.linspace(0, 1, fade)[: hi - b]
    x = x.astype(np.float32)
    if spec.kind == "nonfinite":
        rng = np.random.default_rng(spec.seed + 1)
        i = int(rng.integers(0, n - SR // 10))
        x[i : i + SR // 10] = np.nan
        x[rng.integers(0, n, size=5)] = np.inf
        x[rng.integers(0, n, size=5)] = -np.inf
    return x
