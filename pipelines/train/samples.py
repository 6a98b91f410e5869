"""Rank 0's periodic samples: the configured prompts -> codebook 0 -> DAC audio, logged as WAV + spectrogram."""

from __future__ import annotations

import tempfile

import torch

from configs.schema import ExperimentConfig
from modeling.lm import TextToMusicLM
from modeling.pretrained.codec import load_codec
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.generation import generate_audio, sampling_options, write_samples
from pipelines.train.tracking import RunLogger


class SampleWriter:
    """Rank 0: generates the fixed prompts, decodes codebook 0 with DAC, logs WAV + spectrogram PNG."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        p = cfg.preprocess
        self.cfg = cfg
        self.device = device
        self.text_encoder = TextEncoder(
            p.text_encoder, device=device, max_length=p.text_max_length, setting="preprocess.text_encoder"
        )
        self.codec = load_codec(p.codec, device=device, setting="preprocess.codec")

    def __call__(self, model: TextToMusicLM, step: int, logger: RunLogger | None) -> None:
        g = self.cfg.generation
        samples = generate_audio(
            model,
            list(g.prompts),
            text_encoder=self.text_encoder,
            codec=self.codec,
            device=str(self.device),
            **sampling_options(g, self.cfg.data.frame_rate),
        )
        with tempfile.TemporaryDirectory() as tmp:
            write_samples(samples, tmp, prefix=f"step{step:06d}")
            if logger is not None:
                logger.artifact(tmp, f"samples/step_{step:06d}")
