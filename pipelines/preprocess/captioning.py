"""Model captions as in the paper: an audio-language model describes each 10 s window of a clip, an
instruction-tuned text model rephrases those descriptions into one caption (`captions: model`).

The paper ran LP-MusicCaps on the three 10 s windows of each 30 s clip and had LLaMA-3 rephrase the three into
one. Here each stage is a configurable transformers model, named by hub id (local cache only) or directory:

    stage 1 `AudioCaptioner`  preprocess.caption_audio_model (default Qwen/Qwen2-Audio-7B-Instruct), loaded with
                              AutoProcessor + AutoModelForMultimodalLM, prompted with AUDIO_PROMPT per window
    stage 2 `Rephraser`       preprocess.caption_text_model (default meta-llama/Meta-Llama-3-8B-Instruct), loaded
                              with AutoTokenizer + AutoModelForCausalLM, prompted with `rephrase_messages`

Both decode greedily (do_sample=False), so a caption is a function of the models, the prompts and the audio.
They run as Ray Data actor pools in `pipelines/preprocess/graph.py`; `CaptionCache` keeps every caption they
produce next to the output, keyed by clip and by everything that determines it (`caption_key`), so a rerun
never computes one twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from configs.schema import ExperimentConfig, PreprocessConfig
from pipelines.preprocess.audio import resample
from pipelines.preprocess.captions import CLIP_START_TOLERANCE, resolve_local_model
from pipelines.preprocess.tokens import read_parts, write_part

# Stage 1, once per window: what the music sounds like, without asking about singing (the vocal-cue rule acts on
# what the model says unprompted; a prompt that asks invites "no vocals", which the rule also drops).
AUDIO_PROMPT = (
    "Describe this music in one or two sentences: its genre, mood, tempo, instruments and sound. "
    "Answer with the description only."
)
# Stage 2, once per clip: the window captions, numbered, in order.
REPHRASE_SYSTEM = "You write short, factual descriptions of music for a text-to-music dataset."
REPHRASE_PROMPT = (
    "Here are {n} descriptions of consecutive {seconds:g}-second parts of the same music clip:\n"
    "{captions}\n"
    "Rewrite them as one description of the whole clip, in one or two sentences: its genre, mood, tempo and "
    "instruments. Do not mention the parts or their number. Answer with the description only."
)

CACHE_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("clip_start", pa.float64()),
        ("key", pa.string()),  # caption_key: models, prompts, windows, decoding
        ("windows", pa.list_(pa.string())),  # stage 1, one per window
        ("caption", pa.string()),  # stage 2; null while only stage 1 is done
    ]
)


def rephrase_messages(window_captions: list[str], window_seconds: float) -> list[dict[str, str]]:
    """The chat sent to the rephraser for one clip: REPHRASE_SYSTEM, then REPHRASE_PROMPT with the captions."""
    numbered = "\n".join(f"{i}. {c.strip()}" for i, c in enumerate(window_captions, start=1))
    user = REPHRASE_PROMPT.format(n=len(window_captions), seconds=window_seconds, captions=numbered)
    return [{"role": "system", "content": REPHRASE_SYSTEM}, {"role": "user", "content": user}]


def split_windows(clip: np.ndarray, sr: int, windows: int, seconds: float) -> list[np.ndarray]:
    """The first `windows` consecutive windows of `seconds` of a clip (T,): three 10 s windows of a 30 s clip."""
    n = int(round(seconds * sr))
    if windows * n > len(clip):
        raise ValueError(f"{windows} windows of {seconds:g} s do not fit in a clip of {len(clip) / sr:g} s")
    return [np.asarray(clip[i * n : (i + 1) * n], dtype=np.float32) for i in range(windows)]


def caption_key(p: PreprocessConfig) -> str:
    """A hash of everything a model caption depends on besides the clip: a changed setting never reuses a caption."""
    what = [p.caption_audio_model, p.caption_text_model, AUDIO_PROMPT, REPHRASE_SYSTEM, REPHRASE_PROMPT,
            p.caption_windows, p.caption_window_seconds, p.caption_max_new_tokens, p.sample_rate,
            p.separator]  # the clips are captioned after vocal removal  # fmt: skip
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def caption_cache_dir(cfg: ExperimentConfig) -> Path:
    """preprocess.caption_cache_dir, or caption_cache/ next to data.tokens_dir."""
    p = cfg.preprocess
    return Path(p.caption_cache_dir) if p.caption_cache_dir else Path(cfg.data.tokens_dir).parent / "caption_cache"


def _clean(text: str) -> str:
    text = " ".join(text.split())
    return text.strip().strip('"').strip()


class CaptionCache:
    """The model captions already made: Parquet parts (CACHE_SCHEMA) under `directory`, read once at start.

    Parts are written atomically (`write_part`), one per actor batch, so a crash loses at most the batch in flight.
    Only rows of `key` are used; clip starts match within CLIP_START_TOLERANCE (they are multiples of the clip
    length, so rounding to milliseconds is exact enough).
    """

    def __init__(self, directory: str | Path, key: str):
        self.directory, self.key = Path(directory), key
        self.entries: dict[tuple[str, float], tuple[list[str] | None, str | None]] = {}
        for row in read_parts(self.directory, schema=CACHE_SCHEMA).to_pylist():
            if row["key"] == key:
                windows, caption = self.get(row["track_id"], row["clip_start"])
                self.entries[self._at(row["track_id"], row["clip_start"])] = (
                    row["windows"] or windows,
                    row["caption"] or caption,
                )

    @staticmethod
    def _at(track_id: str, clip_start: float) -> tuple[str, float]:
        return str(track_id), round(float(clip_start) / CLIP_START_TOLERANCE) * CLIP_START_TOLERANCE

    def get(self, track_id: str, clip_start: float) -> tuple[list[str] | None, str | None]:
        """(window captions or None, final caption or None) of one clip."""
        return self.entries.get(self._at(track_id, clip_start), (None, None))

    def put(self, rows: list[tuple[str, float, list[str], str | None]]) -> None:
        """Record (track_id, clip_start, window captions, final caption or None) rows, in memory and on disk."""
        if not rows:
            return
        for track_id, start, windows, caption in rows:
            self.entries[self._at(track_id, start)] = (windows, caption)
        table = pa.Table.from_pylist(
            [dict(track_id=t, clip_start=float(s), key=self.key, windows=w, caption=c) for t, s, w, c in rows],
            schema=CACHE_SCHEMA,
        )
        write_part(table, self.directory)


def compact_cache(directory: str | Path) -> None:
    """Merge the cache's parts into one (two actor batches write two parts; a big run leaves thousands of small
    files that every caption actor would read at start). The merged part is written before the old ones go, so a
    crash in between leaves duplicates, which readers merge."""
    parts = sorted(Path(directory).glob("part-*.parquet"))
    if len(parts) > 1:
        write_part(read_parts(directory, schema=CACHE_SCHEMA), directory)
        for part in parts:
            part.unlink()


def _torch_device(device: str):
    import torch

    return torch.device(device), (torch.bfloat16 if device.startswith("cuda") else torch.float32)


class AudioCaptioner:
    """Stage 1: one caption per audio window, from an audio-language model with a chat template (Qwen2-Audio).

    The processor's chat template puts the audio placeholder before AUDIO_PROMPT; windows are resampled to the
    processor's feature rate (16 kHz for Qwen2-Audio's Whisper features) and captioned `batch_size` at a time with
    greedy decoding.
    """

    def __init__(
        self,
        path_or_id: str,
        device: str = "cpu",
        max_new_tokens: int = 128,
        batch_size: int = 4,
        setting: str = "preprocess.caption_audio_model",
    ):
        local = resolve_local_model(path_or_id, setting)
        from transformers import AutoModelForMultimodalLM, AutoProcessor  # here: slow, and only this stage needs it

        self.device, dtype = _torch_device(device)
        self.processor = AutoProcessor.from_pretrained(local, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
        self.model = AutoModelForMultimodalLM.from_pretrained(local, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.sampling_rate = int(self.processor.feature_extractor.sampling_rate)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        chat = [
            {
                "role": "user",
                "content": [{"type": "audio", "audio_url": "clip"}, {"type": "text", "text": AUDIO_PROMPT}],
            }
        ]
        self.prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def __call__(self, windows: list[np.ndarray], sr: int) -> list[str]:
        """Captions of windows [(T,) float32 at sr, ...], in order."""
        import torch

        out: list[str] = []
        for i in range(0, len(windows), self.batch_size):
            audio = [resample(w, sr, self.sampling_rate) for w in windows[i : i + self.batch_size]]
            inputs = self.processor(
                text=[self.prompt] * len(audio),
                audio=audio,
                sampling_rate=self.sampling_rate,
                return_tensors="pt",
                padding=True,
            ).to(self.device)
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
            new = ids[:, inputs["input_ids"].shape[1] :]  # (B, new tokens): the prompt is left-padded
            out += [_clean(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out


class Rephraser:
    """Stage 2: one caption per clip from its window captions, by an instruction-tuned causal LM (Llama-3-Instruct)
    prompted with `rephrase_messages` through its own chat template; greedy decoding, `batch_size` clips at a time."""

    def __init__(
        self,
        path_or_id: str,
        device: str = "cpu",
        max_new_tokens: int = 128,
        batch_size: int = 4,
        window_seconds: float = 10.0,
        setting: str = "preprocess.caption_text_model",
    ):
        local = resolve_local_model(path_or_id, setting)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # here: slow, and only this stage needs it

        self.device, dtype = _torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True, padding_side="left")
        if self.tokenizer.pad_token is None:  # Llama-3 has none; any id works under the attention mask
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(local, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.max_new_tokens, self.batch_size, self.window_seconds = max_new_tokens, batch_size, window_seconds

    def prompt(self, window_captions: list[str]) -> str:
        """The exact text the model continues for one clip."""
        messages = rephrase_messages(window_captions, self.window_seconds)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, clips: list[list[str]]) -> list[str]:
        """One caption per clip, from each clip's window captions."""
        import torch

        out: list[str] = []
        for i in range(0, len(clips), self.batch_size):
            prompts = [self.prompt(w) for w in clips[i : i + self.batch_size]]
            # The chat template already wrote the special tokens (<|begin_of_text|>): add none twice.
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = ids[:, inputs["input_ids"].shape[1] :]
            out += [_clean(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out
