"""Music synthesis with numpy only: music theory, envelopes and oscillators, instruments, drums and a voice.

FM and wavetable tones with envelopes for bass, chords and melody, drum hits from decaying sines and filtered
noise, and a singing voice (a vibrato sawtooth through vowel formants). Everything renders mono at `SR`;
`pipelines.preprocess.corpus.tracks` arranges these sounds into tracks.
"""

from __future__ import annotations

import numpy as np

SR = 44100

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
        add_at(out, start, tone(instrument, midi, seconds, velocity))
    return out


def add_at(out: np.ndarray, start: float, x: np.ndarray) -> None:
    """Mix `x` into `out` from `start` seconds on; what runs past the end of `out` is cut."""
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
        add_at(out, t0, voice * amp)
    return out
