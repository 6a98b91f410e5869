"""DAC (Descript Audio Codec): load, encode a clip to codes, decode codes (all, the first k, or codebook 0) to audio.

The 44.1 kHz model turns 30 s of mono audio into 9 codebooks x 2584 frames (hop 512, ~86 fps). We call
`preprocess` + `encode` on the whole clip rather than `compress()`, which loudness-normalises and
encodes overlapping windows, so its frames are not a plain 86 fps sequence (REFERENCE.md, Data).

Weights come either from a local file saved by dac (`DAC.save`, read back by `DAC.load`) or from the
cache that `dac.utils.download` fills. We never download: this code runs on machines without
internet, and a miss raises `MissingWeightsError` naming the config setting to change.
`dac` is imported lazily because it takes seconds to import (audiotools).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modeling.pretrained.errors import weights_file

if TYPE_CHECKING:
    import dac


DAC_IDS = ("44khz", "24khz", "16khz")


def dac_cache_path(model_id: str) -> Path:
    """Where `dac.utils.download` caches a model id: "44khz", "44khz_8kbps" or "44khz_8kbps_0.0.1"."""
    from dac.utils import __MODEL_LATEST_TAGS__  # here: dac takes seconds to import (see the module docstring)

    model_type, bitrate, tag = [*model_id.lower().split("_", 2), None, None][:3]
    bitrate = bitrate or "8kbps"
    tag = tag or __MODEL_LATEST_TAGS__.get((model_type, bitrate))
    if model_type not in DAC_IDS or tag is None:
        raise ValueError(
            f"unknown DAC id {model_id!r}; expected one of {list(DAC_IDS)} (optionally _<bitrate>[_<tag>])"
        )
    # Same layout as dac.utils.download, which we must not call: it downloads when the file is absent.
    return Path.home() / ".cache" / "descript" / "dac" / f"weights_{model_type}_{bitrate}_{tag}.pth"


def load_codec(path_or_id: str | Path = "44khz", device: str | torch.device = "cpu", setting: str = "preprocess.codec"):
    """Load a DAC model in eval mode.

    Args:
        path_or_id: a `.pth` saved by dac (`DAC.save`), or a dac model id ("44khz", "44khz_8kbps", ...) resolved
            from dac's download cache without downloading.
        device: where to put the model.
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """
    import dac  # here: dac takes seconds to import (see the module docstring)

    model = dac.DAC.load(str(codec_file(path_or_id, setting)))
    return model.to(device).eval()


def codec_file(path_or_id: str | Path, setting: str = "preprocess.codec") -> Path:
    """The weights file `load_codec` would load, without loading it; MissingWeightsError naming `setting` if absent."""
    return weights_file(
        path_or_id,
        "DAC weights",
        setting,
        "path to a .pth saved by dac",
        cached=lambda spec: dac_cache_path(spec) if spec.split("_", 1)[0].lower() in DAC_IDS else None,
    )


def encode_codes(model: dac.DAC, audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """Encode mono audio at `model.sample_rate` into DAC codes.

    Args:
        audio: (T,) or (B, T) float waveform.
    Returns:
        int16 codes, (n_codebooks, frames) or (B, n_codebooks, frames), frames = ceil(T / hop_length).
    """
    x = torch.as_tensor(audio, dtype=torch.float32)
    single = x.ndim == 1
    x = x.reshape(-1, 1, x.shape[-1]).to(model.device)  # (B, 1, T)
    with torch.inference_mode():
        x = model.preprocess(x, model.sample_rate)  # right-pads to a multiple of the hop
        _, codes, *_ = model.encode(x)  # (B, n_q, frames)
    # Codebook size 1024 fits int16; halves the stored tokens compared with int32.
    codes = codes.cpu().numpy().astype(np.int16)
    return codes[0] if single else codes


def n_frames(model: dac.DAC, n_samples: int) -> int:
    """Frames `encode_codes` gives for a clip of n_samples (30 s at 44.1 kHz -> 2584)."""
    return math.ceil(n_samples / int(model.hop_length))


def decode_codes(model: dac.DAC, codes: np.ndarray | torch.Tensor, n_codebooks: int | None = None) -> np.ndarray:
    """Decode the first `n_codebooks` codebooks of DAC codes to audio (the residual quantizer's partial sum).

    DAC's codebooks are residual: codebook i quantizes what codebooks 0..i-1 left over, so the first k of them
    are a coarser code of the same clip (the paper's Fig. 1). Codebooks from `n_codebooks` on are not read.

    Args:
        codes: (n_q, frames) or (B, n_q, frames) tokens.
        n_codebooks: how many leading codebooks to decode, 1 <= n_codebooks <= n_q (None: all n_q).
    Returns:
        float32 audio, (frames * hop_length,) for unbatched input, else (B, frames * hop_length).
    """
    c = torch.as_tensor(np.asarray(codes), dtype=torch.int64)
    if c.ndim not in (2, 3):
        raise ValueError(f"codes must be (n_q, frames) or (B, n_q, frames); got shape {tuple(c.shape)}")
    single = c.ndim == 2
    if single:
        c = c[None]  # (1, n_q, frames)
    n_q = c.shape[1]
    k = n_q if n_codebooks is None else int(n_codebooks)
    if not 1 <= k <= min(n_q, model.n_codebooks):
        raise ValueError(f"n_codebooks must be in 1..{min(n_q, model.n_codebooks)} for these codes; got {k}")
    c = c[:, :k].to(model.device)  # (B, k, frames)
    with torch.inference_mode():
        z, _, _ = model.quantizer.from_codes(c)  # (B, latent_dim, frames): sum of the k codebooks' projections
        audio = model.decode(z)[:, 0]  # (B, T)
    audio = audio.float().cpu().numpy()
    return audio[0] if single else audio


def decode_codebook0(model: dac.DAC, codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """Decode only codebook 0 to audio, as the paper's models predict that codebook alone.

    Args:
        codes: (frames,) codebook-0 tokens, (n_q, frames), or (B, n_q, frames); only codebook 0 is used.
    Returns:
        float32 audio, (frames * hop_length,) for unbatched input, else (B, frames * hop_length).
    """
    c = np.asarray(codes)
    return decode_codes(model, c[None] if c.ndim == 1 else c, n_codebooks=1)
