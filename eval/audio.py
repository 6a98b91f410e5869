"""Audio preparation shared by every metric: to mono, to the model's sample rate, cut to a length, split, normalise.

Each evaluation model expects its own rate (CLAP 48 kHz, PaSST 32 kHz, VGGish 16 kHz) while the codec and the
references are at 44.1 kHz, so all three metrics resample through `resample` here: one implementation, one set
of filter settings. They follow audiocraft's `convert_audio` (julius `resample_frac`: a Hann-windowed sinc with
24 zero crossings and a 0.945 roll-off), written with `torchaudio.functional.resample`.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF

# julius' defaults, which audiocraft's metrics resample with.
LOWPASS_FILTER_WIDTH = 24
ROLLOFF = 0.945


def as_batch(audio: np.ndarray | torch.Tensor | list) -> torch.Tensor:
    """Audio as a float32 (B, T) mono tensor on the CPU.

    Args:
        audio: (T,) one mono clip, (B, T) a batch of mono clips, or (B, C, T) a batch of multichannel clips (the
            channels are averaged, as audiocraft's `convert_audio(..., to_channels=1)` does). A list of equally
            long 1-D clips is stacked.
    """
    if isinstance(audio, list):
        audio = torch.stack([torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in audio])
    x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio).float().cpu()
    if x.ndim == 1:
        x = x[None]  # (1, T)
    elif x.ndim == 3:
        x = x.mean(dim=1)  # (B, C, T) -> (B, T)
    elif x.ndim != 2:
        raise ValueError(f"audio must be (T,), (B, T) or (B, C, T); got shape {tuple(x.shape)}")
    return x


def resample(audio: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Resample along the last axis (band-limited sinc; a no-op when the rates are equal)."""
    if int(from_rate) == int(to_rate):
        return audio
    return AF.resample(
        audio,
        int(from_rate),
        int(to_rate),
        lowpass_filter_width=LOWPASS_FILTER_WIDTH,
        rolloff=ROLLOFF,
        resampling_method="sinc_interp_hann",
    )


def prepare(
    audio: np.ndarray | torch.Tensor | list, sample_rate: int, to_rate: int, seconds: float | None = None
) -> torch.Tensor:
    """Mono, resampled to `to_rate`, and cut to the first `seconds` (None: the whole clip).

    Returns:
        float32 (B, T') on the CPU, T' <= round(seconds * to_rate).
    """
    x = resample(as_batch(audio), sample_rate, to_rate)
    if seconds is not None:
        x = x[:, : int(round(seconds * to_rate))]
    return x


def split_segments(audio: torch.Tensor, length: int, min_length: int = 0) -> list[torch.Tensor]:
    """Consecutive, non-overlapping segments of `length` samples along the last axis, unpadded.

    The last segment keeps whatever remains; it is dropped when it has `min_length` samples or fewer (PaSST
    cannot classify a sliver, and audiocraft drops tails of <= 0.15 s the same way).
    """
    return [s for s in torch.split(audio, length, dim=-1) if s.shape[-1] > min_length]


def peak_normalize(audio: torch.Tensor, headroom_db: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Scale each clip of (B, T) so its peak sits `headroom_db` below full scale (silence stays silent)."""
    peak = audio.abs().amax(dim=-1, keepdim=True)  # (B, 1)
    return audio * (10 ** (-headroom_db / 20) / peak.clamp_min(eps))
