"""A small generated corpus in the MTG-Jamendo layout: synthesized music, metadata and every bad input.

`make_corpus(out_dir, n_tracks)` writes what the preprocessing pipeline reads from the real dataset:

    out_dir/raw_30s_cleantags_50artists.tsv   TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION, then one field per tag
    out_dir/audio/NN/ID.mp3                    mono 44.1 kHz MP3 (NN = last two digits of the numeric id)
    out_dir/song_describer.csv                 caption_id,track_id,caption (integer track ids, as SDD has them)
    out_dir/captions.jsonl                     {"track_id": "track_...", "caption": "..."} per line
    out_dir/corpus.json                        what each track is and what the pipeline should do with it

Each track is planned from a seeded RNG (genre, tempo, key, mode, instruments, moods) and rendered with
numpy only: FM and wavetable tones with envelopes for bass, chords and melody, drum hits from decaying
sines and filtered noise, and on "vocals" tracks a singing voice (a vibrato sawtooth through vowel
formants). Tags and captions say what was synthesized. The kinds of track (`corpus.json`):

    good        plain music, every 30 s window usable
    vocals      has a voice part, tagged `instrument---voice`; its caption mentions vocals
    silence     20-24 s of digital silence inside one 30 s window (the silence rule's work)
    sdd         listed in song_describer.csv, so held out of training
  and with `bad=True` one of each bad input:
    corrupt     random bytes named .mp3          empty       a 0-byte .mp3
    missing     a row whose PATH does not exist  nonfinite   a float32 WAV holding NaN and inf samples
    short       a 12 s track (no full 30 s clip) malformed   a TSV row with 4 fields and no DURATION
    no_caption  a valid track left out of captions.jsonl

Everything is a function of the seed: the text files are byte-identical and `synthesize` returns the same
samples for the same seed (the MP3 encoder then sees the same input).
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 44100
WINDOW_SECONDS = 30.0  # the pipeline's clip length: silences and the "short" track are placed against it
SHORT_SECONDS = 12.0

TSV_NAME = "raw_30s_cleantags_50artists.tsv"
SDD_NAME = "song_describer.csv"
CAPTIONS_NAME = "captions.jsonl"
MANIFEST_NAME = "corpus.json"
AUDIO_DIR = "audio"
TSV_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")

GOOD_KINDS = ("good", "vocals", "silence", "sdd")
BAD_KINDS = ("corrupt", "empty", "missing", "nonfinite", "short", "malformed", "no_caption")
# Share of the n_tracks given each special kind (at least one each while a good track is left over).
KIND_SHARES = (("sdd", 0.10), ("vocals", 0.25), ("silence", 0.20))
_UNRENDERED = ("corrupt", "empty", "missing")  # kinds whose file holds no music

Note = tuple[float, float, float, float]  # (start s, duration s, MIDI pitch, velocity 0..1)

# ---------------------------------------------------------------------------------------------- music theory

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Chord roots as 0-based scale degrees, one chord per `bars_per_chord` bars.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 0, 4), (5, 3, 0, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2)),
}


def midi_to_hz(m: float | np.ndarray) -> float | np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


def degree_pitch(tonic: int, mode: str, degree: int) -> int:
    """MIDI pitch of a scale degree (0 = tonic; 7 = tonic an octave up; negative goes down)."""
    octave, step = divmod(degree, 7)
    return tonic + 12 * octave + SCALES[mode][step]


def chord_pitches(tonic: int, mode: str, degree: int, sevenths: bool = False) -> list[int]:
    """A diatonic triad (or seventh chord) stacked in thirds on a scale degree."""
    return [degree_pitch(tonic, mode, degree + 2 * i) for i in range(4 if sevenths else 3)]


# ---------------------------------------------------------------------------------- envelopes and oscillators

TABLE_SIZE = 4096


def wavetable(amps: list[float] | np.ndarray) -> np.ndarray:
    """One period (TABLE_SIZE,) of sum_k amps[k-1] sin(2 pi k t), scaled to peak 1."""
    amps = np.asarray(amps, dtype=np.float64)
    k = np.arange(1, len(amps) + 1)[:, None]
    t = np.arange(TABLE_SIZE)[None] / TABLE_SIZE
    table = (amps[:, None] * np.sin(2 * np.pi * k * t)).sum(0)
    return table / np.abs(table).max()


_TABLES = {
    "saw": wavetable(1.0 / np.arange(1, 17)),
    "soft_saw": wavetable(1.0 / np.arange(1, 11) ** 1.5),
    "piano_bright": wavetable([1.0, 0.6, 0.35, 0.25, 0.15, 0.1, 0.06, 0.04, 0.03]),
    "piano_mellow": wavetable([1.0, 0.3, 0.08, 0.03]),
}


def table_osc(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Look up a wavetable at phase (n,) given in cycles. Returns (n,)."""
    return table[(phase * TABLE_SIZE).astype(np.int64) % TABLE_SIZE]


def adsr(n: int, attack: float, decay: float, sustain: float, release: float, gate: float) -> np.ndarray:
    """Piecewise-linear envelope (n,) at SR: rises over `attack` s, falls to `sustain` over `decay` s, holds
    until `gate` s, then falls to 0 over `release` s. Segments shrink when the note is shorter than them."""
    total = n / SR
    gate = min(gate, total)
    a = min(attack, gate)
    d = min(decay, gate - a)
    r = min(release, total - gate)
    xp = [0.0, a, a + d, gate, gate + r, max(total, gate + r)]
    fp = [0.0, 1.0, sustain if d > 0 else 1.0, sustain if d > 0 else 1.0, 0.0, 0.0]
    if a == 0:
        fp[0] = 1.0
    return np.interp(np.arange(n) / SR, xp, fp)


def fm_tone(freq: float, n: int, ratio: float, index: float, index_tau: float) -> np.ndarray:
    """Two-operator FM (n,): sin(2 pi f t + I(t) sin(2 pi ratio f t)), I(t) = index exp(-t / index_tau)."""
    t = np.arange(n) / SR
    mod = index * np.exp(-t / index_tau) * np.sin(2 * np.pi * ratio * freq * t)
    return np.sin(2 * np.pi * freq * t + mod)


def _vibrato_phase(freq: float, n: int, depth_semitones: float, rate_hz: float, delay: float) -> np.ndarray:
    """Phase in cycles (n,) of a tone at freq whose pitch wobbles by +-depth semitones after `delay` s."""
    t = np.arange(n) / SR
    depth = depth_semitones * np.clip((t - delay) / 0.3, 0.0, 1.0)
    f = freq * 2.0 ** (depth * np.sin(2 * np.pi * rate_hz * t) / 12.0)
    return np.cumsum(f) / SR


def tone(instrument: str, midi: float, seconds: float, velocity: float) -> np.ndarray:
    """One note of an instrument at SR: (n,) float64 with n covering `seconds` plus the instrument's tail.

    Instruments: fm_bass, fm_lead, fm_bell, synth_pluck, epiano (FM), piano (bright-to-mellow wavetable
    crossfade with pitch-dependent decay), pad (two detuned soft saws), strings (saw with vibrato).
    """
    f = float(midi_to_hz(midi))
    if instrument == "fm_bass":
        n = int((seconds + 0.04) * SR)
        x = fm_tone(f, n, 1.0, 3.0, 0.12) * np.exp(-np.arange(n) / SR / 0.6) * adsr(n, 0.004, 0, 1, 0.04, seconds)
    elif instrument == "fm_lead":
        n = int((seconds + 0.1) * SR)
        phase = _vibrato_phase(f, n, 0.1, 5.0, 0.25)
        mod = 1.2 * np.sin(2 * np.pi * 2.0 * phase)
        x = np.sin(2 * np.pi * phase + mod) * adsr(n, 0.01, 0.15, 0.7, 0.1, seconds)
    elif instrument == "fm_bell":
        n = int((seconds + 1.5) * SR)
        x = fm_tone(f, n, 3.5, 3.0, 0.8) * np.exp(-np.arange(n) / SR / 1.2) * adsr(n, 0.002, 0, 1, 1.5, seconds)
    elif instrument == "synth_pluck":
        n = int((seconds + 0.05) * SR)
        x = fm_tone(f, n, 1.0, 4.0, 0.05) * np.exp(-np.arange(n) / SR / 0.18) * adsr(n, 0.002, 0, 1, 0.05, seconds)
    elif instrument == "epiano":
        n = int((seconds + 0.3) * SR)
        x = fm_tone(f, n, 1.0, 1.8, 0.25) * np.exp(-np.arange(n) / SR / 1.2) * adsr(n, 0.003, 0, 1, 0.3, seconds)
    elif instrument == "piano":
        n = int((seconds + 0.25) * SR)
        t = np.arange(n) / SR
        phase = f * t
        bright = np.exp(-t / 0.3)  # high partials die first
        body = bright * table_osc(_TABLES["piano_bright"], phase) + (1 - bright) * table_osc(
            _TABLES["piano_mellow"], phase
        )
        tau = float(np.interp(midi, [36, 96], [2.5, 0.5]))
        x = body * np.exp(-t / tau) * adsr(n, 0.002, 0, 1, 0.25, seconds)
    elif instrument == "pad":
        n = int((seconds + 0.6) * SR)
        t = np.arange(n) / SR
        x = 0.5 * (table_osc(_TABLES["soft_saw"], f * 0.997 * t) + table_osc(_TABLES["soft_saw"], f * 1.003 * t))
        x *= adsr(n, min(0.5, seconds / 3), 0.3, 0.8, 0.6, seconds)
    elif instrument == "strings":
        n = int((seconds + 0.25) * SR)
        x = table_osc(_TABLES["saw"], _vibrato_phase(f, n, 0.15, 5.5, 0.15)) * adsr(n, 0.12, 0.1, 0.85, 0.25, seconds)
    else:
        raise ValueError(f"unknown instrument {instrument!r}")
    return velocity * x


def render_notes(instrument: str, notes: list[Note], n: int) -> np.ndarray:
    """Sum the notes of one instrument into a (n,) buffer at SR; tails past the end are cut."""
    out = np.zeros(n)
    for start, seconds, midi, velocity in notes:
        _add(out, start, tone(instrument, midi, seconds, velocity))
    return out


def _add(out: np.ndarray, start: float, x: np.ndarray) -> None:
    i = int(round(start * SR))
    if i >= len(out):
        return
    m = min(len(x), len(out) - i)
    out[i : i + m] += x[:m]


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """White noise (n,) band-limited to [lo, hi] Hz with a brick-wall FFT mask, scaled to peak 1."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / np.abs(x).max()


def drum_kit(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One-shot drum samples at SR: kick (decaying sine swept 155 -> 45 Hz), snare (tone + band noise), hats."""
    t = np.arange(int(0.45 * SR)) / SR
    sweep = 45 + 110 * np.exp(-t / 0.035)
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / SR) * np.exp(-t / 0.18)
    kick[: len(t) // 90] += 0.3 * rng.standard_normal(len(t) // 90) * np.exp(-t[: len(t) // 90] / 0.002)
    t = np.arange(int(0.25 * SR)) / SR
    snare = 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.05) + _band_noise(rng, len(t), 1000, 9000) * np.exp(
        -t / 0.07
    )
    t = np.arange(int(0.3 * SR)) / SR
    hat = _band_noise(rng, len(t), 6000, 16000)
    return {
        "kick": kick,
        "snare": snare / np.abs(snare).max(),
        "hat": hat * np.exp(-t / 0.025),
        "open_hat": hat * np.exp(-t / 0.12),
    }


# Steps of a 16th-note grid per bar: piece -> (steps, velocity).
DRUM_PATTERNS = {
    "four": {"kick": ((0, 4, 8, 12), 1.0), "snare": ((4, 12), 0.7), "open_hat": ((2, 6, 10, 14), 0.35),
             "hat": (tuple(range(0, 16, 2)), 0.25)},
    "backbeat": {"kick": ((0, 7, 8), 1.0), "snare": ((4, 12), 0.8), "hat": (tuple(range(0, 16, 2)), 0.35)},
    "soft": {"kick": ((0, 10), 0.7), "snare": ((4, 12), 0.35), "hat": (tuple(range(0, 16, 2)), 0.2)},
}  # fmt: skip


# ------------------------------------------------------------------------------------------------- the voice

# Alto formants (Hz, bandwidth Hz, relative amplitude) per vowel: F1, F2, F3.
VOWELS = {
    "a": ((800, 80, 1.0), (1150, 90, 0.6), (2800, 120, 0.25)),
    "e": ((400, 60, 1.0), (1600, 80, 0.4), (2700, 120, 0.3)),
    "i": ((350, 50, 1.0), (1700, 100, 0.3), (2700, 120, 0.25)),
    "o": ((450, 70, 1.0), (800, 80, 0.5), (2830, 100, 0.2)),
    "u": ((325, 50, 1.0), (700, 60, 0.3), (2530, 170, 0.15)),
}


def formant_gain(freqs: np.ndarray, vowel: str, width: float = 2.0) -> np.ndarray:
    """Spectral envelope of a vowel at freqs (Hz): a floor plus one Lorentzian peak per formant.
    `width` scales the bandwidths (sung vowels are broader than the spoken ones tabulated above)."""
    g = np.full(freqs.shape, 0.01)
    for fc, bw, amp in VOWELS[vowel]:
        g += amp / (1.0 + ((freqs - fc) / (0.5 * bw * width)) ** 2)
    return g


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centered box filter (n,) -> (n,) by cumulative sums: O(n) whatever the width."""
    width = max(int(width), 1)
    c = np.concatenate([[0.0], np.cumsum(np.pad(x, (width // 2, width - 1 - width // 2)))])  # (n + width,)
    return (c[width:] - c[:-width]) / width


def sing(
    notes: list[Note],
    vowels: list[str],
    n: int,
    *,
    vibrato_semitones: float = 0.3,
    vibrato_hz: float = 5.5,
    seed: int = 0,
) -> np.ndarray:
    """A voice-like part (n,) at SR singing `notes` (one vowel per note from `vowels`).

    Notes that touch (next start within 50 ms of the previous end) form one legato phrase: the pitch
    glides between them and a delayed vibrato sets in on each note. The source is a naive sawtooth plus a
    little breath noise; each vowel's formant envelope is applied in the frequency domain to the whole
    phrase and the vowels are crossfaded note by note.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    phrases: list[list[int]] = []
    for i, (start, _, _, _) in enumerate(notes):
        if phrases and start <= sum(notes[phrases[-1][-1]][:2]) + 0.05:
            phrases[-1].append(i)
        else:
            phrases.append([i])
    for phrase in phrases:
        t0 = notes[phrase[0]][0]
        t1 = notes[phrase[-1]][0] + notes[phrase[-1]][1]
        m = int((t1 - t0 + 0.2) * SR)  # room for the release
        t = np.arange(m) / SR
        pitch = np.full(m, float(notes[phrase[0]][2]))
        since = t.copy()  # seconds since the current note began, for the vibrato's onset
        amp = np.zeros(m)
        weights = {v: np.zeros(m) for v in set(vowels)}
        for j, i in enumerate(phrase):
            start, seconds, midi, velocity = notes[i]
            a = int((start - t0) * SR)
            b = int((start - t0 + seconds) * SR) if j < len(phrase) - 1 else m
            pitch[a:] = midi
            since[a:] = t[a:] - t[a]
            amp[a:b] = velocity
            weights[vowels[i % len(vowels)]][a:b] = 1.0
        pitch = _moving_average(pitch, int(0.04 * SR))  # portamento
        vib = vibrato_semitones * np.clip((since - 0.15) / 0.3, 0, 1) * np.sin(2 * np.pi * vibrato_hz * t)
        phase = np.cumsum(midi_to_hz(pitch + vib)) / SR
        source = 2.0 * (phase % 1.0) - 1.0 + 0.05 * rng.standard_normal(m)
        amp = _moving_average(amp, int(0.03 * SR)) * adsr(m, 0.05, 0, 1, 0.15, m / SR - 0.2)
        nfft = 1 << (m - 1).bit_length()  # a power of two: pocketfft is slow on lengths with large prime factors
        spec = np.fft.rfft(source, nfft)
        freqs = np.fft.rfftfreq(nfft, 1 / SR)
        voice = np.zeros(m)
        for vowel, w in weights.items():
            if w.any():
                voice += _moving_average(w, int(0.05 * SR)) * np.fft.irfft(spec * formant_gain(freqs, vowel), nfft)[:m]
        _add(out, t0, voice * amp)
    return out


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
    n_tracks: int, *, bad: bool = False, seed: int = 0, min_seconds: float = 60.0, max_seconds: float = 100.0
) -> list[TrackSpec]:
    """Plan n_tracks music tracks (+ one of each BAD_KINDS with bad=True), sorted by track number.

    Kinds: about 10% sdd, 25% vocals and 20% silence, at least one of each while one `good` track is left.
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
        count = min(max(1, round(share * n_tracks)), n_tracks - 1 - len(kinds))
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
                    _add(drums, b * bar + s * beat / 4, kit[piece] * velocity * rng.uniform(0.85, 1.0))
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
    the wording (SDD rows use variants 1 and 2, captions.jsonl variant 0)."""
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
    """Song Describer rows (caption_id, integer track_id, caption): one or two captions per `sdd` track."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("caption_id", "track_id", "caption"))
    caption_id = 0
    for spec in specs:
        if spec.kind != "sdd":
            continue
        for variant in range(1, 2 + spec.seed % 2):
            writer.writerow((caption_id, spec.number, caption(spec, variant)))
            caption_id += 1
    return buf.getvalue()


def captions_text(specs: list[TrackSpec]) -> str:
    """captions.jsonl: every track of the TSV except the `no_caption` one."""
    return "".join(
        json.dumps({"track_id": s.track_id, "caption": caption(s)}) + "\n" for s in specs if s.kind != "no_caption"
    )


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
) -> CorpusManifest:
    """Write a corpus of n_tracks music tracks (+ one of each bad input with bad=True) under out_dir.

    Durations are drawn from [min_seconds, max_seconds] (min_seconds >= 30, so that every music track has
    a full clip). Files already in out_dir are overwritten, others are left alone. Returns the manifest
    that is also written to out_dir/corpus.json. With workers > 1, tracks are rendered and encoded in that
    many spawned processes (MP3 encoding dominates; the files do not depend on the number of workers).
    """
    specs = plan_corpus(n_tracks, bad=bad, seed=seed, min_seconds=min_seconds, max_seconds=max_seconds)
    root = Path(out_dir)
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
