"""Plots saved as PNG files (for output folders and MLflow artifacts).

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, never through pyplot: no
window can open, no global figure state leaks between calls, and it works in Ray workers without a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

N_FFT = 2048
HOP = 512
N_MELS = 80  # > one FFT bin per mel band at 44.1 kHz, so no band is empty
TOP_DB = 80.0


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular mel filters with unit area (Slaney norm, so wide high bands are not brighter).

    Returns:
        weights (n_mels, n_fft // 2 + 1).
    """
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))  # (n_mels + 2,) band corners
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # (F,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)) * (2.0 / (hi - lo))  # (n_mels, F)


def mel_cell_bounds(sample_rate: int, n_mels: int = N_MELS) -> np.ndarray:
    """Hz boundaries (n_mels + 1,) of the image rows: halfway, in mel, between neighbouring band centres."""
    step = hz_to_mel(sample_rate / 2) / (n_mels + 1)  # band centres sit at step * (1 .. n_mels)
    return mel_to_hz((np.arange(n_mels + 1) + 0.5) * step)


def mel_spectrogram_db(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-mel power spectrogram in dB relative to its peak, floored TOP_DB below it.

    Returns:
        (n_mels, frames) dB values in [-TOP_DB, 0].
    """
    x = np.nan_to_num(np.asarray(audio, dtype=np.float64).reshape(-1))
    # Centred frames; zero padding (not reflection) so clips shorter than a window work too.
    x = np.pad(x, (N_FFT // 2, N_FFT // 2))
    if len(x) < N_FFT:
        x = np.pad(x, (0, N_FFT - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]  # (frames, N_FFT)
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=-1)) ** 2  # (frames, F)
    mel = mel_filterbank(sample_rate) @ power.T  # (n_mels, frames)
    ref = mel.max() if mel.max() > 0 else 1.0  # silence: everything sits at the floor
    db = 10.0 * np.log10(np.maximum(mel, ref * 10 ** (-TOP_DB / 10)) / ref)
    return db


def _khz(f: float, _pos=None) -> str:
    return f"{f / 1000:g}k" if f >= 1000 else f"{f:g}"


def spectrogram_png(
    audio: np.ndarray, sample_rate: int, path: str | Path, title: str | None = None, dpi: int = 100
) -> Path:
    """Save a log-mel spectrogram of mono audio as a PNG (time in s, frequency in Hz on a mel axis, dB colorbar).

    Args:
        audio: (T,) float waveform; silent, empty or very short audio gives a valid (flat) image.
        sample_rate: of `audio`.
        path: the PNG to write (parent folders are created).
        title: e.g. the caption; wrapped to the figure width, and cut after three lines.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"spectrogram_png expects mono audio (T,), got shape {audio.shape}")
    db = mel_spectrogram_db(audio, sample_rate)  # (n_mels, frames)
    times = np.arange(db.shape[1] + 1) * HOP / sample_rate  # frame boundaries in s
    freqs = mel_cell_bounds(sample_rate)  # row boundaries in Hz

    fig = Figure(figsize=(8, 3), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(times, freqs, db, cmap="magma", vmin=-TOP_DB, vmax=0.0, shading="flat")
    # Bands are equally spaced in mel: a mel-scaled axis shows them evenly while ticks stay in Hz.
    ax.set_yscale("function", functions=(hz_to_mel, mel_to_hz))
    ticks = [t for t in (100, 500, 1000, 2000, 4000, 8000, 16000) if freqs[0] <= t <= freqs[-1]]
    ax.set_yticks(ticks)
    ax.yaxis.set_major_formatter(FuncFormatter(_khz))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    fig.colorbar(mesh, ax=ax, format="%+.0f dB", pad=0.01)
    if title:
        lines = textwrap.wrap(" ".join(title.split()), width=110)
        if len(lines) > 3:
            lines = [*lines[:2], textwrap.shorten(" ".join(lines[2:]), width=106, placeholder=" ...")]
        ax.set_title("\n".join(lines), fontsize=9)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
