"""Frozen Flan-T5 encoder: captions -> right-padded fp16 token embeddings and their lengths.

Flan-T5 is frozen, so preprocessing runs it once per caption and stores the result with the DAC
tokens (DESIGN.md decision 5). Loading goes through transformers' own `from_pretrained` with
`local_files_only=True`: a hub id resolves only from the local Hugging Face cache, a directory from
`save_pretrained` loads as is, and nothing is ever downloaded. A miss raises `MissingWeightsError`
naming the config setting to change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modeling.pretrained.errors import MissingWeightsError, missing


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


class TextEncoder:
    """Flan-T5 encoder over a batch of captions.

    Args:
        path_or_id: a directory written by `save_pretrained` (tokenizer + T5 weights) or a hub id already in the
            local Hugging Face cache (e.g. "google/flan-t5-base").
        device: where the encoder runs.
        max_length: captions are truncated to this many tokens (EOS included).
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """

    def __init__(
        self,
        path_or_id: str | Path = "google/flan-t5-base",
        device: str | torch.device = "cpu",
        max_length: int = 128,
        setting: str = "preprocess.text_encoder",
    ):
        # here: transformers takes seconds to import; code that only passes a TextEncoder around does not need it
        from huggingface_hub import constants, try_to_load_from_cache
        from transformers import AutoTokenizer, T5EncoderModel

        spec = str(path_or_id)
        if _is_local(spec):
            path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                raise missing("Flan-T5 weights", path, setting, "a directory written by save_pretrained")
            spec = str(path)
        else:
            if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                raise missing(
                    f"Flan-T5 {spec!r} (Hugging Face cache)",
                    constants.HF_HUB_CACHE,
                    setting,
                    "a directory written by save_pretrained, or a hub id already in the local cache",
                )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(spec, local_files_only=True)
        except OSError as e:  # a partial cache, e.g. weights present but no tokenizer
            raise MissingWeightsError(f"{e}\nset {setting}=<a directory written by save_pretrained>") from e
        self.tokenizer.padding_side = "right"  # the stored layout: real tokens first, zero rows after
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.dim: int = self.model.config.d_model

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode captions.

        Returns:
            emb: float16 (B, S, dim), S = the longest caption in tokens; rows past a caption's length are zero.
            lengths: int32 (B,) tokens per caption (EOS included).
        """
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        mask = batch["attention_mask"]  # (B, S)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state  # (B, S, dim)
        hidden = hidden * mask[..., None].to(hidden.dtype)
        # Cast after masking and in float32 first: padding rows are exact zeros, real rows round once to fp16.
        return hidden.float().cpu().numpy().astype(np.float16), mask.sum(1).cpu().numpy().astype(np.int32)
