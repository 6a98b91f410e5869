"""Captions -> codebook-0 tokens -> audio, and the files a generation run leaves behind (WAV + spectrogram).

Used by `simba-ttm generate` and by the training loop's periodic samples. Text goes through the same frozen
encoder as preprocessing (right-padded fp16 features + lengths, the layout training read), so a model sees at
generation exactly the condition it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from configs.schema import GenerationConfig
from eval.plots import spectrogram_png
from modeling.lm import TextToMusicLM
from modeling.pretrained.codec import decode_codebook0
from modeling.pretrained.text_encoder import TextEncoder

INDEX_FILE = "prompts.json"
# Hidden sizes of the Flan-T5 encoders, to name the mismatch in errors.
FLAN_T5 = {512: "Flan-T5 Small", 768: "Flan-T5 Base", 1024: "Flan-T5 Large", 2048: "Flan-T5 XL"}


@dataclass
class Sample:
    """One generated clip; `wav` and `png` are set once `write_samples` has written it."""

    caption: str
    tokens: np.ndarray  # (frames,) int64 codebook-0 ids in [0, 1024)
    audio: np.ndarray  # (frames * hop,) float32
    sample_rate: int
    seed: int | None = None  # the seed of its batch (`generate_from_features`): with the settings, it reproduces it
    wav: Path | None = None
    png: Path | None = None


def _text_dim_name(dim: int) -> str:
    return f"{dim}-d text ({FLAN_T5[dim]})" if dim in FLAN_T5 else f"{dim}-d text"


TextFeatures = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]
BatchDone = Callable[[list["Sample"]], None]


def generate_audio(
    model: TextToMusicLM,
    captions: list[str],
    *,
    text_encoder: TextEncoder,
    codec,
    **options,
) -> list[Sample]:
    """Generate one clip per caption, encoding the captions with the frozen `text_encoder`.

    Args:
        model: a decoder on `device` (its train/eval mode is restored afterwards).
        captions: the prompts.
        text_encoder: the frozen encoder the model was trained with (checked by width).
        codec: a DAC model (`modeling.pretrained.codec.load_codec`); audio comes back at `codec.sample_rate`.
        options: `generate_from_features`'s sampling options.
    Returns:
        one Sample per caption, in order, with `wav` / `png` unset.
    Raises:
        ValueError when the text encoder's width is not the one the model was trained on.
    """
    if text_encoder.dim != model.text_dim:
        raise ValueError(
            f"the checkpoint expects {_text_dim_name(model.text_dim)} but the text encoder gives "
            f"{_text_dim_name(text_encoder.dim)}; use the encoder the model was trained with "
            "(preprocess.text_encoder in its config)"
        )
    return generate_from_features(
        model, captions, lambda rows: text_encoder([captions[i] for i in rows]), codec=codec, **options
    )


@torch.no_grad()
def generate_from_features(
    model: TextToMusicLM,
    captions: list[str],
    features: TextFeatures,
    *,
    codec,
    n_frames: int,
    top_k: int = 250,
    top_p: float = 0.0,
    temperature: float = 1.0,
    cfg_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 4,
    compile: bool = False,
    device: str | torch.device = "cpu",
    on_batch: BatchDone | None = None,
) -> list[Sample]:
    """Generate one clip per caption from text features computed beforehand (an eval set stores them).

    Batch b is sampled with seed `seed + b`: batches differ from each other, and the whole call is
    reproducible for a given (seed, batch_size).

    Args:
        captions: the prompts (kept with the samples; `features` gives what the model reads).
        features: caption rows -> right-padded (B, S, text_dim) float16 features and (B,) lengths, the layout
            training read (`TextEncoder.__call__`, `EvalSet.text_batch`).
        codec: a DAC model; audio comes back at `codec.sample_rate`.
        n_frames: codec frames per clip (~86 per second).
        top_k, top_p, temperature, cfg_scale: sampling, as in `TextToMusicLM.generate`.
        batch_size: captions per `generate` call.
        compile: decode with the compiled step (`modeling.compiled`; attention-free SiMBA only).
        on_batch: called with each batch's samples as soon as they are decoded (to write them, show progress).
    Raises:
        ValueError when the features' width is not the model's.
    """
    if n_frames < 1 or batch_size < 1:
        raise ValueError(f"n_frames and batch_size must be >= 1, got {n_frames} and {batch_size}")
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    samples = []
    for b, start in enumerate(range(0, len(captions), batch_size)):
        rows = list(range(start, min(start + batch_size, len(captions))))
        emb, lengths = features(rows)  # (B, S, text_dim) fp16 right-padded, (B,)
        if emb.shape[-1] != model.text_dim:
            raise ValueError(
                f"the checkpoint expects {_text_dim_name(model.text_dim)} but the captions' features are "
                f"{_text_dim_name(emb.shape[-1])}; use the text encoder the model was trained with"
            )
        text = torch.from_numpy(np.asarray(emb)).to(device=device, dtype=dtype)
        lengths = torch.from_numpy(np.asarray(lengths)).to(device)
        mask = torch.arange(text.shape[1], device=device)[None] < lengths[:, None]  # (B, S)
        tokens = model.generate(
            text,
            mask,
            n_frames,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            cfg_scale=cfg_scale,
            seed=seed + b,
            compile=compile,
        )  # (B, n_frames)
        tokens = tokens.cpu().numpy()
        # One clip at a time: decoding 30 s clips as a batch would multiply the codec's activation memory.
        batch = [
            Sample(
                captions[row], toks, decode_codebook0(codec, toks).astype(np.float32), int(codec.sample_rate), seed + b
            )
            for row, toks in zip(rows, tokens, strict=True)
        ]
        samples += batch
        if on_batch is not None:
            on_batch(batch)
    return samples


def sampling_options(g: GenerationConfig, frame_rate: float) -> dict:
    """`generate_audio` keyword arguments from a generation config (frames from seconds at `frame_rate`)."""
    return dict(
        n_frames=g.n_frames(frame_rate),
        top_k=g.top_k,
        top_p=g.top_p,
        temperature=g.temperature,
        cfg_scale=g.cfg_scale,
        seed=g.seed,
        batch_size=g.batch_size,
        compile=g.compile,
    )


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe form of a caption: lowercase ASCII letters, digits and single dashes, at most max_len."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "untitled"


def write_samples(
    samples: list[Sample], out_dir: str | Path, prefix: str = "sample", *, first: int = 0, about: dict | None = None
) -> list[Sample]:
    """Write each sample as `{prefix}_{i:02d}_{slug}.wav` (16-bit PCM) and `.png` (spectrogram), plus an index;
    i counts from `first` (a later batch of the same call goes on numbering).

    Audio louder than full scale is scaled down to peak 1 (16-bit PCM would clip it); quieter audio is written
    as generated, so loudness stays comparable across samples. `prompts.json` in `out_dir` lists caption,
    files, duration and seed per sample, with `about`'s items (what made it: checkpoint, settings); entries of
    other files already there are kept.

    Returns:
        the samples with `wav` and `png` set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, entries = [], []
    for i, sample in enumerate(samples, start=first):
        stem = f"{prefix}_{i:02d}_{slugify(sample.caption)}"
        audio = np.nan_to_num(np.asarray(sample.audio, dtype=np.float32))
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > 1.0:
            audio = audio / peak
        wav = out_dir / f"{stem}.wav"
        sf.write(wav, audio, sample.sample_rate, subtype="PCM_16")
        png = spectrogram_png(audio, sample.sample_rate, out_dir / f"{stem}.png", title=sample.caption)
        written.append(dataclasses.replace(sample, wav=wav, png=png))
        entries.append(
            {
                "caption": sample.caption,
                "wav": wav.name,
                "png": png.name,
                "seconds": round(len(audio) / sample.sample_rate, 3),
                "frames": len(sample.tokens),
                "peak_normalised": peak > 1.0,
                **({"seed": sample.seed} if sample.seed is not None else {}),
                **(about or {}),
            }
        )
    index = out_dir / INDEX_FILE
    try:
        previous = json.loads(index.read_text()) if index.is_file() else []
    except ValueError:  # a damaged index is rebuilt rather than blocking the samples
        previous = []
    if not isinstance(previous, list):
        previous = []
    names = {e["wav"] for e in entries}
    kept = [e for e in previous if isinstance(e, dict) and e.get("wav") not in names]
    index.write_text(json.dumps(kept + entries, indent=2, ensure_ascii=False) + "\n")
    return written
