"""CLAP score: how well generated audio matches its caption (text-audio alignment).

As audiocraft's `CLAPTextConsistencyMetric`, with LAION's music CLAP through transformers (`ClapModel` +
`ClapProcessor`, default `laion/larger_clap_music`, the conversion of LAION's `music_audioset_epoch_15_esc_90.14`
checkpoint that audiocraft loads through laion_clap):

- audio: mono, resampled to the feature extractor's rate (48 kHz), one window of `max_length_s` (10 s): shorter
  clips are repeated then zero-padded (`repeatpad`), longer ones cut (`rand_trunc`);
- text: padded and truncated to 77 tokens, as LAION's tokenizer settings;
- score: the mean over (clip, caption) pairs of the cosine between the projected audio and text embeddings.

One deviation, for reproducibility: a clip longer than the window is cut to its *first* 10 s here, where
`rand_trunc` takes a random 10 s crop. Evaluation clips are 10 s long, so nothing is cut in practice.

The audio embeddings double as a second FAD embedding (`eval.fad_embedder: clap`, see eval/fad.py).

Loading goes through transformers' `from_pretrained(..., local_files_only=True)`: a hub id resolves only from
the local Hugging Face cache, a directory written by `save_pretrained` loads as is, and nothing is downloaded.
A miss raises `MissingWeightsError` naming the setting (`eval.clap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.audio import as_batch, prepare
from modeling.pretrained.errors import MissingWeightsError, missing

DEFAULT_CLAP = "laion/larger_clap_music"
TEXT_MAX_LENGTH = 77  # LAION CLAP's text length (audiocraft: padding="max_length", max_length=77)
HINT = "a directory written by save_pretrained (ClapModel + ClapProcessor), or a hub id already in the local cache"


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def clap_source(path_or_id: str | Path, setting: str = "eval.clap") -> str:
    """What `from_pretrained` should load: a local `save_pretrained` folder or a hub id found in the local cache.
    Raises `MissingWeightsError` naming `setting` when neither holds; loads nothing."""
    from huggingface_hub import constants, try_to_load_from_cache

    spec = str(path_or_id)
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise missing("CLAP weights", path, setting, HINT)
        return str(path)
    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise missing(f"CLAP {spec!r} (Hugging Face cache)", constants.HF_HUB_CACHE, setting, HINT)
    return spec


class Clap:
    """LAION CLAP (transformers) in eval mode: audio and captions -> unit-norm embeddings in one space.

    Args:
        path_or_id: a directory written by `save_pretrained` (model and processor: feature extractor + tokenizer),
            or a hub id already in the local Hugging Face cache.
        device: where the model runs.
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """

    def __init__(
        self, path_or_id: str | Path = DEFAULT_CLAP, device: str | torch.device = "cpu", setting: str = "eval.clap"
    ):
        # here: transformers takes seconds to import; code that only passes a Clap around does not need it
        from transformers import ClapModel, ClapProcessor

        spec = clap_source(path_or_id, setting)
        try:
            self.processor = ClapProcessor.from_pretrained(spec, local_files_only=True)
            self.model = ClapModel.from_pretrained(spec, local_files_only=True)
        except OSError as e:  # a partial cache or folder, e.g. weights present but no processor files
            raise MissingWeightsError(f"{e}\nset {setting}=<{HINT}>") from e
        tokenizer = self.processor.tokenizer
        # Without tokenizer files, transformers falls back to a tokenizer of special tokens only (5 ids), and
        # every caption would encode to <s> <unk>... </s>: refuse instead of scoring garbage.
        if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
            raise missing(f"CLAP tokenizer (only {len(tokenizer)} special tokens loaded)", spec, setting, HINT)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.sample_rate: int = int(self.processor.feature_extractor.sampling_rate)  # 48 kHz
        self.window_seconds: float = float(self.processor.feature_extractor.max_length_s)  # 10 s
        self.dim: int = int(self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_audio(
        self, audio: np.ndarray | torch.Tensor, sample_rate: int, batch_size: int | None = None
    ) -> torch.Tensor:
        """Projected, unit-norm audio embeddings.

        Args:
            audio: (T,), (B, T) or (B, C, T) at `sample_rate`.
            batch_size: clips per forward pass (None: all at once). Each clip is featurised on its own and the
                model runs in eval mode, so a clip's embedding does not depend on its batch neighbours.
        Returns:
            float32 (B, dim) on the CPU.
        """
        x = prepare(audio, sample_rate, self.sample_rate, seconds=self.window_seconds)  # (B, T <= 10 s at 48 kHz)
        out = []
        for chunk in torch.split(x, batch_size or max(len(x), 1)):
            features = self.processor.feature_extractor(
                list(chunk.numpy()),
                sampling_rate=self.sample_rate,
                truncation="rand_trunc",  # LAION's non-fusion path; nothing is longer than the window here
                padding="repeatpad",
                return_tensors="pt",
            )
            emb = self.model.get_audio_features(
                input_features=features["input_features"].to(self.device),
                is_longer=features["is_longer"].to(self.device),
            )
            out.append(_pooled(emb).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def embed_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        """Projected, unit-norm text embeddings of captions padded / truncated to 77 tokens: float32 (B, dim)."""
        texts = list(texts)
        step = batch_size or max(len(texts), 1)
        out = []
        for start in range(0, len(texts), step):
            tokens = self.processor.tokenizer(
                texts[start : start + step],
                padding="max_length",
                truncation=True,
                max_length=TEXT_MAX_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            emb = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            out.append(_pooled(emb).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object whose `pooler_output` is the projected embedding; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def cosines(audio_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each (audio, text) row pair: (B, D), (B, D) -> (B,)."""
    return torch.nn.functional.cosine_similarity(audio_emb.double(), text_emb.double(), dim=-1, eps=1e-8)


@dataclass
class ClapScore:
    score: float  # mean cosine over the pairs
    cosines: np.ndarray  # (B,) float64, one per (clip, caption) pair


def clap_score(
    clap: Clap, audio: np.ndarray | torch.Tensor, sample_rate: int, texts: list[str], batch_size: int | None = None
) -> ClapScore:
    """CLAP score of clips against their captions (clip i was generated from texts[i]).

    Args:
        audio: (B, T) or (B, C, T) at `sample_rate`.
        texts: B captions.
    """
    audio = as_batch(audio)
    if len(audio) != len(texts):
        raise ValueError(f"clap_score needs one caption per clip; got {len(audio)} clips and {len(texts)} texts")
    if not len(texts):
        raise ValueError("clap_score needs at least one (clip, caption) pair")
    cos = cosines(clap.embed_audio(audio, sample_rate, batch_size), clap.embed_text(texts, batch_size))
    return ClapScore(score=float(cos.mean()), cosines=cos.numpy())
