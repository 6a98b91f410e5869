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
from matplotlib.lines import Line2D
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


# --- Fig. 1 and Fig. 3 ------------------------------------------------------------------------------------------

# One colour per run, the same in every panel (matplotlib's default cycle, written out: no global state read).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
NO_DATA = "no data"


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _no_data(ax, text: str = NO_DATA) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=12)
    ax.set_xticks([])  # an empty panel's 0..1 axes would read as values
    ax.set_yticks([])


def codebooks_png(
    ks: list[int],
    fad: list[float],
    clap: list[float],
    clap_reference: float,
    path: str | Path,
    fad_label: str = "FAD",
    note: str | None = None,
    dpi: int = 100,
) -> Path:
    """Fig. 1: FAD (reconstruction vs original) and CLAP score (reconstruction vs caption) against the number of
    DAC codebooks k decoded, with the original references' CLAP score as a dashed line. Two panels, one PNG.

    Args:
        ks, fad, clap: one value per k.
        fad_label: the FAD axis label (e.g. naming the embedder).
        note: a line under the title (e.g. that the models are tiny random ones).
    """
    fig = Figure(figsize=(10, 4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_fad, ax_clap = fig.subplots(1, 2)
    ax_fad.plot(ks, fad, marker="o", color=COLORS[0])
    ax_fad.set_ylabel(f"{fad_label} (lower is better)")
    ax_fad.set_title("FAD: reconstruction vs original")
    ax_clap.plot(ks, clap, marker="o", color=COLORS[1], label="reconstruction")
    ax_clap.axhline(clap_reference, color="0.3", linestyle="--", label="original references")
    ax_clap.set_ylabel("CLAP score (higher is better)")
    ax_clap.set_title("CLAP: reconstruction vs caption")
    ax_clap.legend(loc="best", fontsize=9)
    for ax in (ax_fad, ax_clap):
        ax.set_xlabel("codebooks decoded (k)")
        ax.set_xticks(list(ks))
        ax.grid(alpha=0.3)
    fig.suptitle("DAC reconstructions from the first k codebooks" + (f"\n{note}" if note else ""), fontsize=11)
    return _save(fig, path, dpi)


def metrics_over_steps_png(
    runs: list[tuple[str, dict[str, tuple[list[int], list[float]]]]],
    path: str | Path,
    note: str | None = None,
    dpi: int = 100,
) -> Path:
    """Fig. 3: FAD, KLD and CLAP score against the optimizer step, one line per run, and a train/val loss panel.

    Args:
        runs: (label, {metric: (steps, values)}) per run, metrics among `eval/fad`, `eval/kld`, `eval/clap`,
            `train_loss`, `val_loss`; a missing or empty series is not drawn, and a panel with none says so.
        note: a line under the title.
    """
    panels = (
        ("eval/fad", "FAD (lower is better)"),
        ("eval/kld", "KLD (lower is better)"),
        ("eval/clap", "CLAP score (higher is better)"),
    )
    fig = Figure(figsize=(12, 8.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).reshape(-1)
    for ax, (key, title) in zip(axes, panels, strict=False):
        missing = []
        for i, (label, series) in enumerate(runs):
            steps, values = series.get(key, ([], []))
            if len(steps):
                ax.plot(steps, values, marker="o", markersize=4, color=COLORS[i % len(COLORS)], label=label)
            else:
                missing.append(label)
        if len(missing) == len(runs):
            _no_data(ax)
        elif missing:  # under the title, where no data point can hide it
            title += "\n" + textwrap.shorten(f"{NO_DATA}: " + ", ".join(missing), width=90, placeholder=" ...")
        ax.set_title(title, fontsize=11 if "\n" not in title else 9)
    ax = axes[3]
    drawn = False
    for i, (_, series) in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        steps, values = series.get("train_loss", ([], []))
        if len(steps):  # every step: thin and light, so that the sparse validation points stay visible
            ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.6)
        steps_val, values_val = series.get("val_loss", ([], []))
        if len(steps_val):
            ax.plot(steps_val, values_val, linestyle="--", marker="o", markersize=3, color=color, linewidth=1.6)
        drawn = drawn or bool(len(steps) or len(steps_val))
    if drawn:
        ax.plot([], [], "-", color="0.3", alpha=0.6, label="train")  # a style legend: colours are the runs
        ax.plot([], [], "--", marker="o", markersize=3, color="0.3", label="validation")
        ax.legend(loc="upper right", fontsize=9)
    else:
        _no_data(ax)
    ax.set_title("loss (cross-entropy, codebook 0)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], marker="o", label=label) for i, (label, _) in
               enumerate(runs)]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 3), fontsize=9)
    fig.suptitle("Metrics over training" + (f"\n{note}" if note else ""), fontsize=12)
    return _save(fig, path, dpi)
