"""Experiment configuration: one typed dataclass per concern, one YAML file per experiment.

A YAML file maps 1:1 onto `ExperimentConfig`: a top-level `name` plus one section per dataclass
(`model`, `data`, `preprocess`, `train`, `generation`, `mlflow`). Every field is type-checked and range-checked in
`__post_init__`, so a config that constructs is one the rest of the code can trust, whether it came
from a file, from `section.key=value` overrides, or from Python. Errors are `ConfigError`s that name
the key by its dotted path (`model.d_state`) and say what would have been valid.

The defaults are the paper's setup (REFERENCE.md, "The paper's setup"); `configs/paper.yaml` spells
them out and a test keeps the two equal.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DAC_N_CODEBOOKS = 9  # DAC 44.1 kHz: 9 residual codebooks of 1024 entries
DAC_FRAME_RATE = 44100 / 512  # hop 512 at 44.1 kHz -> 86.1328125 frames/s


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or is out of range. The message names the key."""


# --------------------------------------------------------------------------------------------------
# Type checking, driven by the dataclass annotations


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _type_error(key: str, tp: Any, value: object) -> ConfigError:
    return ConfigError(f"{key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _parse_number(text: str) -> object:
    """'1e-4' -> 0.0001, '12' -> 12; anything else is returned unchanged.

    PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, so numeric strings must be accepted
    for numeric fields or `lr: 1e-4` would be rejected.
    """
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            pass
    return text


def _to_int(value: object, key: str) -> int:
    v = _parse_number(value) if isinstance(value, str) else value
    if isinstance(v, bool):  # bool is an int subclass; `true` is never a count
        raise _type_error(key, int, value)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():  # 85e3 or 500.0 are fine, 2.5 is not
        return int(v)
    raise _type_error(key, int, value)


def _to_float(value: object, key: str) -> float:
    v = _parse_number(value) if isinstance(value, str) else value
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _type_error(key, float, value)
    if not math.isfinite(v):
        raise ConfigError(f"{key} expects a finite float, got {value!r}")
    return float(v)


def _coerce(value: object, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and return it in canonical form (e.g. list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _type_error(key, tp, value)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{key} expects {_type_name(tp)} ({len(args)} items), got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        return _to_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None or isinstance(value, Mapping):
            return _build(tp, value, key)
        raise ConfigError(f"{key} expects a mapping of {tp.__name__} keys, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _build(cls: type, data: Mapping[str, Any] | None, prefix: str) -> Any:
    """cls(**data), after rejecting unknown keys with the list of valid ones and a suggestion."""
    if data is None:  # an empty YAML section (`model:` with everything commented out)
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'the config'} expects a mapping, got {data!r}")
    names = _field_names(cls)
    for key in data:
        if key not in names:
            raise _unknown_key(key, names, prefix)
    return cls(**data)


def _unknown_key(key: object, names: list[str], prefix: str) -> ConfigError:
    msg = f"unknown key {_join(prefix, key)!r}; valid keys: {', '.join(sorted(names))}"
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        msg += f" (did you mean {_join(prefix, close[0])!r}?)"
    return ConfigError(msg)


def _plain(value: Any) -> Any:
    """Nested dicts of YAML-safe values: tuples become lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Section:
    """Base of every config dataclass: type-check and canonicalise each field, then `_validate`."""

    _section: ClassVar[str] = ""  # the YAML section, for dotted key names in errors

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        self._validate()

    def _key(self, name: str) -> str:
        return _join(self._section, name)

    def _require(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)} must be {what}, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig(_Section):
    """The decoder: Prefix SiMBA (Mamba-2 + MLP blocks) or the Cross Transformer baseline."""

    _section: ClassVar[str] = "model"

    arch: Literal["simba", "transformer"] = "simba"
    d_model: int = 1024
    n_layers: int = 24
    vocab_size: int = 1025  # 1024 codes of codebook 0 + id 1024 for BOS/pad
    text_dim: int = 768  # Flan-T5 Base hidden size
    mlp_dim: int = 2048
    dropout: float = 0.3
    n_heads: int = 16  # Transformer layers and any attention layers of a hybrid SiMBA
    # Mamba-2 (mamba_ssm constructor names)
    d_state: int = 512
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    attn_layers: list[int] = field(default_factory=list)  # SiMBA layer indices made attention (hybrid)
    cond_dropout: float = 0.1  # P(caption -> null condition) in training, so CFG is trained
    norm_eps: float = 1e-5

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
        self._require("vocab_size", self.vocab_size >= 2, ">= 2 (codes + the BOS/pad id)")
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


@dataclass
class DataConfig(_Section):
    """The token dataset written by preprocessing, and how training reads it."""

    _section: ClassVar[str] = "data"

    tokens_dir: str = "data/tokens"
    max_frames: int = 2588  # first 2588 DAC frames (~30.05 s), padded with the pad id
    frame_rate: float = DAC_FRAME_RATE  # a property of the codec; a field so it is logged with the run
    codebook: int = 0  # the one DAC codebook that is modelled
    val_fraction: float = 0.02
    seed: int = 0

    def _validate(self) -> None:
        self._require("tokens_dir", bool(self.tokens_dir), "a non-empty path")
        self._require("max_frames", self.max_frames > 0, "> 0")
        self._require("frame_rate", self.frame_rate > 0.0, "> 0")
        self._require("codebook", 0 <= self.codebook < DAC_N_CODEBOOKS, f"in 0..{DAC_N_CODEBOOKS - 1}")
        self._require("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")


@dataclass
class PreprocessConfig(_Section):
    """MTG-Jamendo -> DAC tokens + Flan-T5 embeddings (paper section 3), as a Ray Data pipeline.

    Pretrained parts are named by identifier or local path; nothing is downloaded here.
    """

    _section: ClassVar[str] = "preprocess"

    metadata_tsv: str = "data/jamendo/raw_30s_cleantags_50artists.tsv"
    audio_root: str = "data/jamendo/audio"
    exclude_csv: str | None = "data/song_describer.csv"  # Song Describer ids to exclude
    rejects_dir: str = "data/rejects"  # tokens go to data.tokens_dir
    sample_rate: int = 44100
    clip_seconds: float = 30.0
    seed: int = 0  # picks each track's clip order
    separator: str = "htdemucs"  # demucs model name (from the local torch hub cache) or a .th file
    max_silence_seconds: float = 15.0  # after vocal removal, more silence than this drops the clip
    silence_threshold_db: float = -60.0
    captions: Literal["tags", "file", "model"] = "tags"
    caption_file: str | None = None  # CSV or JSONL keyed by track_id, for captions: file
    caption_model: str | None = None  # hub id or local path, for captions: model
    vocal_words: list[str] | None = None  # None: pipelines.filters.DEFAULT_VOCAL_WORDS
    codec: str = "44khz"  # DAC weights: "44khz" (dac's own cache) or a .pth path
    text_encoder: str = "google/flan-t5-base"  # hub id (local cache only) or a local directory
    text_max_length: int = 128
    separator_actors: int = 1
    codec_actors: int = 1
    text_actors: int = 1
    gpus_per_actor: float = 0.3  # per model actor (separator, codec, text); 0.3 shares one GPU three ways
    batch_size: int = 2  # clips per model-actor batch

    def _validate(self) -> None:
        for name in ("metadata_tsv", "audio_root", "rejects_dir", "separator", "codec", "text_encoder"):
            self._require(name, bool(getattr(self, name)), "a non-empty string")
        self._require("sample_rate", self.sample_rate > 0, "> 0")
        self._require("clip_seconds", self.clip_seconds > 0.0, "> 0")
        self._require("max_silence_seconds", self.max_silence_seconds >= 0.0, ">= 0")
        self._require("silence_threshold_db", self.silence_threshold_db < 0.0, "< 0 (dBFS)")
        self._require("text_max_length", self.text_max_length > 0, "> 0")
        for name in ("separator_actors", "codec_actors", "text_actors", "batch_size"):
            self._require(name, getattr(self, name) >= 1, ">= 1")
        self._require("gpus_per_actor", 0.0 <= self.gpus_per_actor <= 1.0, "in [0, 1]")
        if self.captions == "file" and not self.caption_file:
            raise ConfigError("preprocess.captions is 'file' but preprocess.caption_file is not set")
        if self.captions == "model" and not self.caption_model:
            raise ConfigError("preprocess.captions is 'model' but preprocess.caption_model is not set")


@dataclass
class TrainConfig(_Section):
    """Optimisation, schedule, checkpoints and the Ray Train scaling of one training run."""

    _section: ClassVar[str] = "train"

    batch_size: int = 4  # per worker, per micro-step
    grad_accum: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    warmup_steps: int = 100  # optimizer steps of linear warm-up
    min_lr_ratio: float = 0.005  # cosine decays to min_lr_ratio * lr
    max_steps: int = 85000  # optimizer steps
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on a GPU that has it, else fp32
    num_workers: int = 1
    use_gpu: bool = True
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 3
    val_every: int = 500  # optimizer steps; 0 disables
    generate_every: int = 5000  # optimizer steps; 0 disables
    max_nonfinite_steps: int = 10  # consecutive skipped steps with a non-finite loss before the run fails
    max_failures: int = 2  # Ray Train restarts a crashed worker group this often (from the last checkpoint)
    storage_path: str = "runs"
    seed: int = 0

    def _validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "num_workers", "checkpoint_every", "keep_checkpoints"):
            self._require(name, getattr(self, name) >= 1, ">= 1")
        for name in (
            "warmup_steps",
            "val_every",
            "generate_every",
            "max_nonfinite_steps",
            "max_failures",
            "weight_decay",
            "grad_clip",
        ):
            self._require(name, getattr(self, name) >= 0, ">= 0")
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


@dataclass
class GenerationConfig(_Section):
    """Sampling: top-k / top-p, temperature and classifier-free guidance."""

    _section: ClassVar[str] = "generation"

    seconds: float = 10.0
    top_k: int = 250  # 0 disables
    top_p: float = 0.0  # 0 disables
    temperature: float = 1.0
    cfg_scale: float = 3.0  # logits = uncond + cfg_scale * (cond - uncond); 1 = no guidance
    seed: int = 0
    batch_size: int = 4
    # Decode with the compiled SiMBA step (modeling/compiled.py): ~4x faster per token on a CPU, after a
    # one-off compilation (~30 s); models with attention layers decode eagerly whatever this says.
    compile: bool = False
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


@dataclass
class MLflowConfig(_Section):
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


@dataclass
class ExperimentConfig(_Section):
    """One experiment: what one YAML file in configs/ describes."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def _validate(self) -> None:
        self._require("name", bool(self.name.strip()), "non-empty")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExperimentConfig:
        """Build from nested plain dicts (a parsed YAML file, or `to_dict()` passed through Ray)."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts of YAML-safe values; `from_dict(cfg.to_dict()) == cfg`."""
        return _plain(dataclasses.asdict(self))

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


# --------------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(path: str | Path) -> Path:
    """A path to a YAML file, or the bare name of a shipped config (`paper` -> configs/paper.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix == "" and p.parent == Path("."):
        shipped = CONFIG_DIR / f"{p.name}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(path)!r} not found; give a YAML path or one of: {names}")


def _check_key_path(parts: list[str], schema: type) -> None:
    """Reject an override key the schema does not have, whatever the file it applies to contains."""
    cls: Any = schema
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{prefix!r} is a value, not a section")
        names = _field_names(cls)
        if part not in names:
            raise _unknown_key(part, names, prefix)
        cls = _hints(cls)[part]


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str], schema: type | None = ExperimentConfig
) -> dict[str, Any]:
    """Return a copy of `raw` with `section.key=value` overrides applied (values parsed as YAML).

    `model.attn_layers=[3,7]`, `train.lr=3e-4`, `model.arch=transformer`, `name=foo`. Keys are checked
    against `schema` (None: not checked here); values are checked when the config is built.
    """
    if isinstance(overrides, str):  # a lone "a.b=c" would otherwise be iterated character by character
        overrides = [overrides]
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (or name=value)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        *parents, leaf = key.split(".")
        if schema is not None:
            try:
                _check_key_path([*parents, leaf], schema)
            except ConfigError as e:
                raise ConfigError(f"override {item!r}: {e}") from None
        node = out
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])!r} is a value, not a section")
            node = child
        node[leaf] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (None: the defaults, i.e. the paper's setup), apply overrides, validate.

    Raises ConfigError naming the offending dotted key; FileNotFoundError for a missing file.
    """
    raw: Any = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            raw = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{resolved}: not valid YAML: {e}") from e
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{resolved}: expected a mapping of sections at the top level, got {raw!r}")
    return ExperimentConfig.from_dict(apply_overrides(raw, overrides))
