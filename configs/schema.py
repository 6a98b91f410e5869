"""Experiment configuration: one typed dataclass per concern, one YAML file per experiment.

An experiment (`ExperimentConfig`) has a `name` and one section per dataclass (`model`, `data`,
`preprocess`, `train`, `generation`, `mlflow`, `eval`, `tune`). The dataclasses are the single source of truth: the
YAML files map 1:1 onto them, model constructors receive their fields as plain keyword arguments.

Types are checked by pydantic (the classes are pydantic dataclasses: `ModelConfig(d_state="abc")` fails
like a bad YAML value does); ranges and cross-field rules are checked in `_validate`. Either way the
error is a `ConfigError` that names the key by its dotted path (`model.d_state`) and says what would
have been valid. Reading files, inheritance (`base:`) and `key=value` overrides are in `configs/loading.py`.

The defaults are the paper's setup (REFERENCE.md, "The paper's setup"); `configs/paper.yaml` spells
them out and a test keeps the two equal.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml

from configs.validation import (
    Bool,
    ConfigError,
    Float,
    Int,
    Section,
    check_key_path,
    config_error,
    field_types,
    plain,
    section,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DAC_N_CODEBOOKS = 9  # DAC 44.1 kHz: 9 residual codebooks of 1024 entries
DAC_CODEBOOK_SIZE = 1024  # codes per DAC codebook (every DAC model): token ids 0..1023
DAC_FRAME_RATE = 44100 / 512  # hop 512 at 44.1 kHz -> 86.1328125 frames/s


# --------------------------------------------------------------------------------------------------
# Sections


@section
class ModelConfig(Section):
    """The decoder: Prefix SiMBA (Mamba-2 + MLP blocks) or the Cross Transformer baseline."""

    _section: ClassVar[str] = "model"

    arch: Literal["simba", "transformer"] = "simba"
    d_model: Int = 1024
    n_layers: Int = 24
    vocab_size: Int = 1025  # 1024 codes of codebook 0 + id 1024 for BOS/pad
    text_dim: Int = 768  # Flan-T5 Base hidden size
    mlp_dim: Int = 2048
    dropout: Float = 0.3
    n_heads: Int = 16  # Transformer layers and any attention layers of a hybrid SiMBA
    # Mamba-2 (mamba_ssm constructor names)
    d_state: Int = 512
    d_conv: Int = 4
    expand: Int = 2
    headdim: Int = 64
    ngroups: Int = 1
    chunk_size: Int = 256
    attn_layers: list[Int] = field(default_factory=list)  # SiMBA layer indices made attention (hybrid)
    cond_dropout: Float = 0.1  # P(caption -> null condition) in training, so CFG is trained
    norm_eps: Float = 1e-5

    @property
    def pad_id(self) -> int:
        """The BOS / padding token: the last id of the vocabulary."""
        return self.vocab_size - 1

    def _validate(self) -> None:
        for name in (
            "d_model",
            "n_layers",
            "text_dim",
            "mlp_dim",
            "n_heads",
            "d_state",
            "d_conv",
            "expand",
            "headdim",
            "ngroups",
            "chunk_size",
        ):
            self._require(name, getattr(self, name) > 0, "> 0")
        self._require(
            "vocab_size",
            self.vocab_size >= DAC_CODEBOOK_SIZE + 1,
            f">= {DAC_CODEBOOK_SIZE + 1} (DAC's {DAC_CODEBOOK_SIZE} codes + the BOS/pad id, the last)",
        )
        self._require("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        self._require("cond_dropout", 0.0 <= self.cond_dropout < 1.0, "in [0, 1)")
        self._require("norm_eps", self.norm_eps > 0.0, "> 0")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        d_inner = self.expand * self.d_model
        if d_inner % self.headdim:
            raise ConfigError(
                f"model.expand * model.d_model ({d_inner}) must be divisible by model.headdim ({self.headdim})"
            )
        if (d_inner // self.headdim) % self.ngroups:
            raise ConfigError(
                f"the Mamba-2 head count (expand * d_model / headdim = {d_inner // self.headdim}) must be divisible "
                f"by model.ngroups ({self.ngroups})"
            )
        if self.attn_layers and self.arch != "simba":
            raise ConfigError(
                f"model.attn_layers {self.attn_layers} makes a hybrid SiMBA and needs model.arch 'simba', "
                f"got {self.arch!r}; use [] for the Transformer"
            )
        for i, layer in enumerate(self.attn_layers):
            if not 0 <= layer < self.n_layers:
                raise ConfigError(
                    f"model.attn_layers[{i}] = {layer} is out of range for model.n_layers = {self.n_layers} "
                    f"(valid: 0..{self.n_layers - 1})"
                )
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ConfigError(f"model.attn_layers has duplicates: {self.attn_layers}")


@section
class DataConfig(Section):
    """The token dataset written by preprocessing, and how training reads it."""

    _section: ClassVar[str] = "data"

    tokens_dir: str = "data/tokens"
    max_frames: Int = 2588  # first 2588 DAC frames (~30.05 s), padded with the pad id
    frame_rate: Float = DAC_FRAME_RATE  # a property of the codec; a field so it is logged with the run
    codebook: Int = 0  # the one DAC codebook that is modelled
    val_fraction: Float = 0.02  # the share of tracks (split: hash) or artists (split: artist) in validation
    seed: Int = 0
    # How preprocessing assigns a kept track to train or val: hash of the track id; artist (hash of the artist id,
    # so no artist is on both sides); file (the tracks listed in split_file are val, e.g. MTG-Jamendo's
    # splits/split-0/autotagging-validation.tsv, every other track train).
    split: Literal["hash", "file", "artist"] = "hash"
    split_file: str | None = None

    def _validate(self) -> None:
        self._require("tokens_dir", bool(self.tokens_dir), "a non-empty path")
        if self.split == "file" and not self.split_file:
            raise ConfigError("data.split is 'file' but data.split_file is not set (the validation split TSV)")
        self._require("max_frames", self.max_frames > 0, "> 0")
        self._require("frame_rate", self.frame_rate > 0.0, "> 0")
        self._require("codebook", 0 <= self.codebook < DAC_N_CODEBOOKS, f"in 0..{DAC_N_CODEBOOKS - 1}")
        self._require("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")


@section
class PreprocessConfig(Section):
    """MTG-Jamendo -> DAC tokens + Flan-T5 embeddings (paper section 3), as a Ray Data pipeline.

    Pretrained parts are named by identifier or local path; nothing is downloaded here.
    """

    _section: ClassVar[str] = "preprocess"

    metadata_tsv: str = "data/jamendo/raw_30s_cleantags_50artists.tsv"
    audio_root: str = "data/jamendo/audio"
    exclude_csv: str | None = "data/song_describer.csv"  # Song Describer ids to exclude
    rejects_dir: str = "data/rejects"  # tokens go to data.tokens_dir
    sample_rate: Int = 44100
    clip_seconds: Float = 30.0
    seed: Int = 0  # picks each track's clip order
    separator: str = "htdemucs"  # demucs model name (from the local torch hub cache) or a .th file
    max_silence_seconds: Float = 15.0  # after vocal removal, more silence than this drops the clip
    silence_threshold_db: Float = -60.0
    captions: Literal["tags", "file", "model"] = "tags"
    caption_file: str | None = None  # CSV, TSV or JSONL: track_id, caption, optional clip_start (captions: file)
    # captions: model (two stages, each a hub id in the local cache or a local directory; greedy decoding)
    caption_audio_model: str = "Qwen/Qwen2-Audio-7B-Instruct"  # audio -> text, one caption per window
    caption_text_model: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # rephrases a clip's window captions into one
    caption_windows: Int = 3  # windows captioned per clip (paper: three 10 s windows of the 30 s clip)
    caption_window_seconds: Float = 10.0
    caption_max_new_tokens: Int = 128  # per generated caption, both stages
    caption_batch_size: Int = 4  # windows (audio stage) or prompts (text stage) per generate call
    caption_audio_actors: Int = 1
    caption_text_actors: Int = 1
    caption_cpus_per_actor: Float = 1.0  # CPUs each caption actor reserves (0: share the cores; they wait on a GPU)
    caption_candidates: Int = 1  # clips passed on to the captioners per track; the first whose caption passes is kept
    caption_cache_dir: str | None = None  # None: caption_cache/ next to data.tokens_dir
    vocal_words: list[str] | None = None  # None: pipelines.filters.DEFAULT_VOCAL_WORDS
    codec: str = "44khz"  # DAC weights: "44khz" (dac's own cache) or a .pth path
    text_encoder: str = "google/flan-t5-base"  # hub id (local cache only) or a local directory
    text_max_length: Int = 128
    separator_actors: Int = 1
    codec_actors: Int = 1
    text_actors: Int = 1
    gpus_per_actor: Float = 0.3  # per model actor (separator, codec, text); 0.3 shares one GPU three ways
    batch_size: Int = 2  # clips per model-actor batch

    def _validate(self) -> None:
        for name in ("metadata_tsv", "audio_root", "rejects_dir", "separator", "codec", "text_encoder"):
            self._require(name, bool(getattr(self, name)), "a non-empty string")
        self._require("sample_rate", self.sample_rate > 0, "> 0")
        self._require("clip_seconds", self.clip_seconds > 0.0, "> 0")
        self._require("max_silence_seconds", self.max_silence_seconds >= 0.0, ">= 0")
        self._require("silence_threshold_db", self.silence_threshold_db < 0.0, "< 0 (dBFS)")
        self._require("text_max_length", self.text_max_length > 0, "> 0")
        for name in ("separator_actors", "codec_actors", "text_actors", "batch_size", "caption_windows",
                     "caption_max_new_tokens", "caption_batch_size", "caption_audio_actors", "caption_text_actors",
                     "caption_candidates"):  # fmt: skip
            self._require(name, getattr(self, name) >= 1, ">= 1")
        self._require("caption_window_seconds", self.caption_window_seconds > 0.0, "> 0")
        self._require("caption_cpus_per_actor", self.caption_cpus_per_actor >= 0.0, ">= 0")
        self._require("gpus_per_actor", 0.0 <= self.gpus_per_actor <= 1.0, "in [0, 1]")
        if self.captions == "file" and not self.caption_file:
            raise ConfigError("preprocess.captions is 'file' but preprocess.caption_file is not set")
        if self.captions == "model":
            for name in ("caption_audio_model", "caption_text_model"):
                self._require(name, bool(getattr(self, name)), "a hub id or a local directory with captions: model")
            windows = self.caption_windows * self.caption_window_seconds
            self._require(
                "caption_windows",
                windows <= self.clip_seconds + 1e-9,
                f"such that caption_windows x caption_window_seconds ({windows:g} s) fits in clip_seconds",
            )


@section
class TrainConfig(Section):
    """Optimisation, schedule, checkpoints and the Ray Train scaling of one training run."""

    _section: ClassVar[str] = "train"

    batch_size: Int = 4  # per worker, per micro-step
    grad_accum: Int = 32
    lr: Float = 1e-4
    weight_decay: Float = 0.02
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-7
    warmup_steps: Int = 100  # optimizer steps of linear warm-up
    min_lr_ratio: Float = 0.005  # cosine decays to min_lr_ratio * lr
    max_steps: Int = 85000  # optimizer steps
    label_smoothing: Float = 0.1
    grad_clip: Float = 1.0  # max global grad norm; 0 disables
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on a GPU that has it, else fp32
    num_workers: Int = 1
    use_gpu: Bool = True
    checkpoint_every: Int = 500  # optimizer steps
    keep_checkpoints: Int = 3
    val_every: Int = 500  # optimizer steps; also at every checkpoint (its report carries val_loss); 0 disables
    generate_every: Int = 5000  # optimizer steps; 0 disables
    max_nonfinite_steps: Int = 10  # consecutive skipped steps with a non-finite loss before the run fails
    max_failures: Int = 2  # Ray Train restarts a crashed worker group this often (from the last checkpoint)
    storage_path: str = "runs"
    seed: Int = 0
    ema_decay: Float = 0.0  # 0 = off (paper); e.g. 0.99 (MusicGen): samples, best/ and model.pt use the EMA weights
    log_every: Int = 10  # optimizer steps between progress lines (MLflow gets every step)
    peak_tflops: Float = 0.0  # per worker, for MFU; 0 = the datasheet figure of a known GPU, else a measured matmul
    eval_every: Int = 0  # optimizer steps between FAD/KLD/CLAP of eval.limit captions during training; 0 = off
    eval_checkpoint_every: Int = 0  # keep weights-only model.pt files every N steps (never pruned) to evaluate later

    def _validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "num_workers", "checkpoint_every", "keep_checkpoints",
                     "log_every"):  # fmt: skip
            self._require(name, getattr(self, name) >= 1, ">= 1")
        for name in (
            "warmup_steps",
            "val_every",
            "generate_every",
            "max_nonfinite_steps",
            "max_failures",
            "weight_decay",
            "grad_clip",
            "peak_tflops",
            "eval_every",
            "eval_checkpoint_every",
        ):
            self._require(name, getattr(self, name) >= 0, ">= 0")
        self._require("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)")
        self._require("lr", self.lr > 0.0, "> 0")
        self._require("eps", self.eps > 0.0, "> 0")
        self._require("betas", all(0.0 <= b < 1.0 for b in self.betas), "two values in [0, 1)")
        self._require("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]")
        self._require("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)")
        self._require("storage_path", bool(self.storage_path), "a non-empty path")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must not exceed train.max_steps ({self.max_steps})"
            )

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step over all workers (paper: 4 x 32 = 128)."""
        return self.batch_size * self.grad_accum * self.num_workers


@section
class GenerationConfig(Section):
    """Sampling: top-k / top-p, temperature and classifier-free guidance."""

    _section: ClassVar[str] = "generation"

    seconds: Float = 10.0
    top_k: Int = 250  # 0 disables
    top_p: Float = 0.0  # 0 disables
    temperature: Float = 1.0
    cfg_scale: Float = 3.0  # logits = uncond + cfg_scale * (cond - uncond); 1 = no guidance
    seed: Int = 0
    batch_size: Int = 4
    # Decode with the compiled SiMBA step (modeling/compiled.py): ~4x faster per token on a CPU, after a
    # one-off compilation (~30 s); models with attention layers decode eagerly whatever this says.
    compile: Bool = False
    # Fixed captions generated during training (every train.generate_every steps) and by default in eval.
    prompts: list[str] = field(
        default_factory=lambda: [
            "A calm piano piece with soft strings, relaxing mood.",
            "An energetic rock track with electric guitar, bass and drums.",
            "An upbeat electronic dance track with synthesizer and a steady beat.",
            "A slow ambient soundscape with pads and gentle textures.",
        ]
    )

    def _validate(self) -> None:
        self._require("seconds", self.seconds > 0.0, "> 0")
        self._require("top_k", self.top_k >= 0, ">= 0 (0 disables)")
        self._require("top_p", 0.0 <= self.top_p <= 1.0, "in [0, 1] (0 disables)")
        self._require("temperature", self.temperature > 0.0, "> 0")
        self._require("cfg_scale", self.cfg_scale >= 0.0, ">= 0")
        self._require("batch_size", self.batch_size >= 1, ">= 1")

    def n_frames(self, frame_rate: float) -> int:
        """Codec frames to generate for `seconds` of audio (10 s at 86.13 fps -> 862)."""
        return math.ceil(self.seconds * frame_rate)


@section
class MLflowConfig(Section):
    """Where runs are logged."""

    _section: ClassVar[str] = "mlflow"

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "simba-ttm"

    def _validate(self) -> None:
        self._require("tracking_uri", self.tracking_uri is None or bool(self.tracking_uri), "null or non-empty")
        self._require("experiment", bool(self.experiment), "non-empty")

    def resolved_tracking_uri(self) -> str:
        """The URI to use now: the configured one, else $MLFLOW_TRACKING_URI, else a local SQLite store."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@section
class EvalConfig(Section):
    """FAD, KLD and CLAP (eval/): the models behind them, by hub id / cache id or local path (never downloaded)."""

    _section: ClassVar[str] = "eval"

    clap: str = "laion/larger_clap_music"  # CLAP score (+ FAD on CLAP): hub id (local cache only) or a local directory
    passt: str = "passt_s_swa_p16_128_ap476"  # KLD classifier: this id (torch hub cache) or a PaSST .pt state dict
    vggish: str = "vggish"  # FAD embedder: this id (torch hub cache) or a torchvggish .pth state dict
    fad_embedder: Literal["vggish", "clap"] = "vggish"
    seconds: Float = 10.0  # generations and references are compared over their first `seconds`
    limit: Int | None = None  # the first N captions of the eval set; None: all
    batch_size: Int = 8  # clips per forward pass of CLAP, PaSST and VGGish
    # The eval set (`simba-ttm make-evalset`): Song Describer captions + audio, or any CSV of that layout.
    set_csv: str = "data/song_describer.csv"  # caption_id, track_id, caption, path (audio under set_audio_root)
    set_audio_root: str = "data/song_describer/audio"
    set_dir: str = "data/evalset"  # evalset/*.parquet: caption, T5 embedding, reference audio + DAC codes
    reference_offset: Float = 0.0  # seconds into each audio file where the reference clip starts
    # `simba-ttm evaluate` on Ray: generation tasks, then an actor pool of scorers (CLAP + PaSST + VGGish each)
    generators: Int = 1  # generation tasks over the captions (one GPU each when the device is cuda)
    actors: Int = 1  # scorer actors
    gpus_per_actor: Float = 0.5  # per scorer actor; 0 = on CPUs

    def _validate(self) -> None:
        for name in ("clap", "passt", "vggish", "set_csv", "set_audio_root", "set_dir"):
            self._require(name, bool(getattr(self, name)), "a non-empty string")
        self._require("seconds", self.seconds > 0.0, "> 0")
        self._require("limit", self.limit is None or self.limit >= 1, "null (all) or >= 1")
        self._require("batch_size", self.batch_size >= 1, ">= 1")
        self._require("reference_offset", self.reference_offset >= 0.0, ">= 0")
        self._require("generators", self.generators >= 1, ">= 1")
        self._require("actors", self.actors >= 1, ">= 1")
        self._require("gpus_per_actor", self.gpus_per_actor >= 0.0, ">= 0")


# `tune.space` combinations checked together before Ray starts (a config built each: ~0.1 ms); past that, trials do.
MAX_CHECKED_COMBINATIONS = 4096
# The distributions of `tune.space`, as Ray Tune names them; each value is a list: [name, arguments...].
SPACE_DISTRIBUTIONS = {
    "choice": "[choice, v1, v2, ...]: one of the values, uniformly",
    "grid": "[grid, v1, v2, ...]: every value, each in its own trial(s)",
    "uniform": "[uniform, lo, hi]: a float in [lo, hi)",
    "loguniform": "[loguniform, lo, hi]: a float in [lo, hi), uniform in log space (lo > 0)",
    "randint": "[randint, lo, hi]: an int in lo..hi-1",
}
TRIAL_RESOURCES = ("cpu", "gpu")
# What a trial reports to Tune at every validation and checkpoint (evaluation scores go to MLflow only, for now).
TUNE_METRICS = ("val_loss", "train_loss")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@section
class TuneConfig(Section):
    """A hyperparameter search over this experiment (`simba-ttm tune`): Ray Tune trials of the training loop.

    `space` maps any config key to a distribution, written as a list that starts with its name:

        space:
          model.dropout: [uniform, 0.1, 0.4]
          model.d_state: [choice, 64, 128, 256, 512]
          train.lr: [loguniform, 3.0e-5, 3.0e-4]

    The shapes of the distributions are checked here; that each key exists and each value makes a valid config is
    checked by `ExperimentConfig` (`check_space`), which knows the other sections.
    """

    _section: ClassVar[str] = "tune"

    space: dict[str, Any] = field(default_factory=dict)  # config key -> [distribution, arguments...]
    num_samples: Int = 16  # trials (with `grid` values: trials per grid point)
    max_concurrent_trials: Int = 1  # 0: as many as the cluster's resources fit
    metric: str = "val_loss"  # one of TUNE_METRICS: what trials report at every validation and checkpoint
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"  # asha: stop the worse trials at rungs of grace_period x rf^k steps
    grace_period: Int = 1000  # optimizer steps every trial runs before ASHA may stop it
    reduction_factor: Float = 3.0  # ASHA keeps the best 1 / reduction_factor at each rung
    search: Literal["random", "optuna"] = "random"  # optuna: TPE (Ray Tune's OptunaSearch)
    resources_per_trial: dict[str, Float] = field(default_factory=lambda: {"cpu": 4.0, "gpu": 1.0})
    max_failures: Int = 0  # retries of a crashed trial (from its last checkpoint); an OOM would only crash again
    seed: Int = 0  # the search's own random state (trials train with train.seed)

    def _validate(self) -> None:
        self._require("num_samples", self.num_samples >= 1, ">= 1")
        self._require("max_concurrent_trials", self.max_concurrent_trials >= 0, ">= 0 (0: as many as fit)")
        self._require(
            "metric",
            self.metric in TUNE_METRICS,
            f"one of the metrics trials report: {', '.join(TUNE_METRICS)} (evaluation scores such as eval/clap are "
            "logged to MLflow during training, not reported to Tune)",
        )
        self._require("grace_period", self.grace_period >= 1, ">= 1 (optimizer steps)")
        self._require("reduction_factor", self.reduction_factor > 1.0, "> 1")
        self._require("max_failures", self.max_failures >= 0, ">= 0")
        for name, amount in self.resources_per_trial.items():
            if name not in TRIAL_RESOURCES:
                raise ConfigError(
                    f"tune.resources_per_trial has an unknown resource {name!r}; valid: {', '.join(TRIAL_RESOURCES)}"
                )
            if amount < 0:
                raise ConfigError(f"tune.resources_per_trial.{name} must be >= 0, got {amount!r}")
        if not self.resources_per_trial.get("cpu", 0) > 0:
            raise ConfigError(f"tune.resources_per_trial needs cpu > 0, got {self.resources_per_trial!r}")
        for key, spec in self.space.items():
            self._check_distribution(key, spec)
        if self.search == "optuna" and any(spec[0] == "grid" for spec in self.space.values()):
            raise ConfigError("tune.space has a grid, which tune.search 'optuna' cannot search: use choice, or random")

    def _check_distribution(self, key: str, spec: Any) -> None:
        where = f"tune.space[{key!r}]"
        valid = "; ".join(SPACE_DISTRIBUTIONS.values())
        if not isinstance(spec, list) or not spec or spec[0] not in SPACE_DISTRIBUTIONS:
            raise ConfigError(f"{where} must be a distribution, got {spec!r}; valid: {valid}")
        kind, args = spec[0], spec[1:]
        if kind in ("choice", "grid"):
            if not args:
                raise ConfigError(f"{where}: {kind} needs at least one value, got {spec!r}")
            return
        if len(args) != 2 or not all(_is_number(a) for a in args):
            raise ConfigError(
                f"{where}: {kind} needs two numbers, lo and hi, got {spec!r} ({SPACE_DISTRIBUTIONS[kind]})"
            )
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs lo < hi, got {spec!r}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs lo > 0, got {spec!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs two ints, got {spec!r}")

    def candidate_values(self, key: str) -> list[Any]:
        """Values of `key` that stand for all its distribution can give: every listed value, or a range's ends."""
        kind, *args = self.space[key]
        if kind in ("choice", "grid"):
            return list(args)
        return [args[0], args[1] - 1] if kind == "randint" else list(args)


@section
class ExperimentConfig(Section):
    """One experiment: what one YAML file in configs/ describes."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def _validate(self) -> None:
        self._require("name", bool(self.name.strip()), "non-empty")
        self.check_space()

    @property
    def run_dir(self) -> Path:
        """The folder the training run (or the sweep) of this name writes: checkpoints, best/, config.yaml, eval/."""
        return Path(self.train.storage_path) / self.name

    def check_space(self) -> None:
        """Every key of `tune.space` exists (and is not of the tune section), and every value its distribution can
        give makes a valid config: a misspelt key or an out-of-range value fails here, before Ray starts."""
        if not self.tune.space:
            return
        base = self._space_base()
        for key, spec in self.tune.space.items():
            parts = key.split(".")
            if parts[0] in ("tune", "name") or len(parts) != 2:
                choices = ", ".join(f"{s}.<key>" for s in base if s not in ("tune", "name"))
                raise ConfigError(f"tune.space key {key!r} is not a config key to search; use one of {choices}")
            try:
                check_key_path(parts, type(self))
            except ConfigError as e:
                raise ConfigError(f"tune.space: {e}") from None
            field_type = field_types(type(getattr(self, parts[0])))[parts[1]]
            type_name = getattr(field_type, "__name__", str(field_type))
            if spec[0] in ("uniform", "loguniform") and field_type is not float:
                raise ConfigError(f"tune.space[{key!r}]: {spec[0]} draws floats, but {key} is {type_name}")
            if spec[0] == "randint" and field_type is not int:
                raise ConfigError(f"tune.space[{key!r}]: randint draws ints, but {key} is {type_name}")
            for value in self.tune.candidate_values(key):
                try:
                    _config_with(base, {key: value})
                except ConfigError as e:
                    raise ConfigError(f"tune.space[{key!r}] = {spec!r} can give {key} = {value!r}: {e}") from None

    def check_space_combinations(self) -> None:
        """Values of several keys that are valid alone can clash (`model.expand * model.d_model` must divide by
        `model.headdim`): every combination of the keys' candidate values makes a valid config, checked when there
        are at most MAX_CHECKED_COMBINATIONS (a trial that draws a clash otherwise fails with the message). Called by
        `simba-ttm tune` before Ray starts, not by every load: a trial's checkpoint keeps its sweep's space, and one
        of an older sweep whose space could clash must still load."""
        keys = list(self.tune.space)
        candidates = [self.tune.candidate_values(key) for key in keys]
        if len(keys) < 2 or math.prod(map(len, candidates)) > MAX_CHECKED_COMBINATIONS:
            return
        base = self._space_base()
        for values in itertools.product(*candidates):
            try:
                _config_with(base, dict(zip(keys, values, strict=True)))
            except ConfigError as e:
                drawn = ", ".join(f"{key} = {value!r}" for key, value in zip(keys, values, strict=True))
                raise ConfigError(
                    f"tune.space can give {drawn} together: {e}; narrow the space so that no trial draws this"
                ) from None

    def _space_base(self) -> dict[str, Any]:
        """This config as nested dicts for `_config_with`, without its search space: the configs built from it do
        not check a space again."""
        return {**self.to_dict(), "tune": {}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExperimentConfig:
        """Build from nested plain dicts (a parsed YAML file, or `to_dict()` passed through Ray).

        An empty section (`model:` with everything commented out) means that section's defaults.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"the config expects a mapping of sections, got {data!r}")
        sections = {name for name, tp in field_types(cls).items() if dataclasses.is_dataclass(tp)}
        data = {k: {} if v is None and k in sections else v for k, v in data.items()}
        try:
            return pydantic.TypeAdapter(cls).validate_python(data)
        except pydantic.ValidationError as e:
            raise config_error(e, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts of YAML-safe values; `from_dict(cfg.to_dict()) == cfg`."""
        return plain(dataclasses.asdict(self))

    def flatten(self) -> dict[str, Any]:
        """{'name': ..., 'model.d_model': 1024, ...}: one entry per field, e.g. for MLflow params."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    def dump_yaml(self, path: str | Path) -> Path:
        """Write the full config (every field) as YAML that `load_config` reads back to an equal config."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        return path


def _config_with(base: dict[str, Any], values: Mapping[str, Any]) -> ExperimentConfig:
    """`base` (nested dicts) with each dotted `section.key` of `values` set, built and so validated (ConfigError)."""
    d = copy.deepcopy(base)
    for key, value in values.items():
        section, name = key.split(".")
        d[section][name] = value
    return ExperimentConfig.from_dict(d)
