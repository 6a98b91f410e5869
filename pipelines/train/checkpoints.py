"""Checkpoint files: `model.pt` (shared by training, generation and evaluation) and the training state.

A training checkpoint is a directory with `model.pt` and `state.pt` (optimizer, scheduler, `TrainState`);
Ray Train restarts a crashed run from the latest one (`save_checkpoint` / `load_checkpoint`).

`model.pt` is a plain `torch.save` of {"format", "model" (state dict on CPU), "config" (ExperimentConfig as
nested dicts), "step"}: only tensors and YAML-safe values, so it always loads with `weights_only=True` and a
checkpoint can never run code on the machine that opens it. The config travels with the weights, so a
checkpoint rebuilds its own model without the YAML it was trained from.

A checkpoint can be named by the file, by the directory holding it (a Ray Train checkpoint), or by any
folder above (a Ray Train run folder): the latter resolves to the checkpoint with the highest saved step, or
with pick="best" to the run's `best/model.pt` (lowest validation loss, kept beside the last K).
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs.schema import ExperimentConfig
from modeling.builders import build_model
from modeling.lm import TextToMusicLM
from pipelines.files import atomic_write
from pipelines.train.ema import EMA

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
BEST_DIR = "best"  # a run folder's checkpoint of the lowest validation loss so far (model.pt only)
LOCAL_CHECKPOINT_PREFIX = "checkpoint_local_"  # what a local-mode run writes into its run folder
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
FORMAT = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel and/or torch.compile wrappers (their keys carry prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def save_model(
    directory: str | Path, model: nn.Module, cfg: ExperimentConfig, step: int, *,
    weights: dict[str, torch.Tensor] | None = None, val_loss: float | None = None,
) -> Path:  # fmt: skip
    """Write `directory/model.pt` atomically (temporary file + rename): a reader never sees half a file.

    weights: what to store instead of the model's own state dict (the EMA weights); val_loss: recorded with
    the best checkpoint.
    Returns:
        the path of the written file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = unwrap(model).state_dict() if weights is None else weights
    state = {k: v.detach().cpu() for k, v in weights.items()}
    payload = {"format": FORMAT, "model": state, "config": cfg.to_dict(), "step": int(step)}
    if val_loss is not None:
        payload["val_loss"] = float(val_loss)
    return _atomic_save(payload, directory / MODEL_FILE)


def _atomic_save(payload: dict, final: Path) -> Path:
    """torch.save to a temporary file beside `final`, then rename: a reader never sees half a file."""
    return atomic_write(final, lambda tmp: torch.save(payload, tmp))


def _load(file: Path, mmap: bool = False) -> dict:
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; anything else would fail less clearly
        raise ValueError(f"{file} is not a simba-ttm checkpoint (not a file torch.save wrote)")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers: this file holds code objects.
        raise ValueError(f"{file}: refusing to load, it holds more than tensors and plain values:\n{e}") from e
    except RuntimeError as e:  # a zip archive, but not one torch.save wrote, or a damaged one
        raise ValueError(f"{file} is not a simba-ttm checkpoint (torch cannot read it: {e})") from e
    if not isinstance(data, dict) or not {"format", "model", "config", "step"} <= data.keys():
        raise ValueError(f"{file} is not a simba-ttm checkpoint (expected keys format, model, config, step)")
    if data["format"] != FORMAT:
        raise ValueError(f"{file}: checkpoint format {data['format']!r} is not supported (this code reads {FORMAT})")
    return data


def saved_step(file: str | Path) -> int:
    """The training step stored in a model file; memory-mapped, so the weights are not read."""
    return int(_load(Path(file), mmap=True)["step"])


def saved_config(file: str | Path) -> ExperimentConfig:
    """The experiment config stored in a model file (memory-mapped: the weights are not read)."""
    return ExperimentConfig.from_dict(_load(Path(file), mmap=True)["config"])


def run_folder(checkpoint: Path, cfg: ExperimentConfig) -> Path:
    """The run folder a checkpoint file sits in (the nearest folder above it with the run's config.yaml, so a
    run copied elsewhere still works), else the one its config names."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    return cfg.run_dir


def check_one_run(path: Path, files: list[Path], advice: str) -> None:
    """Raise ValueError, listing them, when the model `files` found under `path` belong to several runs (`path` is a
    storage folder or a sweep's folder): taking the highest step or merging them by step would mix runs silently.
    A run is its folder and its name (a sweep's trials share the sweep's config.yaml, not their name)."""
    runs: dict[tuple[Path, str], int] = {}
    for file in files:
        cfg = saved_config(file)
        run = (run_folder(file, cfg), cfg.name)
        runs[run] = runs.get(run, 0) + 1
    if len(runs) > 1:
        listing = "\n".join(
            f"  {folder}: {name} ({count} checkpoints)" for (folder, name), count in sorted(runs.items())
        )
        raise ValueError(f"{path} holds the checkpoints of {len(runs)} runs; {advice}:\n{listing}")


def find_checkpoint(path: str | Path, pick: str = "last") -> Path:
    """Resolve a file, a checkpoint directory or a run folder to one model file.

    pick: "last", the highest step (ties: the newest file); or "best", the lowest validation loss among the
    `best/` checkpoints a run keeps (see `TrainRecipe`). A file is returned as it is.
    Raises:
        FileNotFoundError naming the places searched.
        ValueError when the folder holds the checkpoints of several runs, listing them.
    """
    if pick not in ("last", "best"):
        raise ValueError(f"pick must be 'last' or 'best', got {pick!r}")
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    # Nested checkpoints (Ray Train's checkpoint_* folders); skip hidden folders, where partial writes live.
    found = [f for f in path.rglob(MODEL_FILE) if not any(p.startswith(".") for p in f.relative_to(path).parts)]
    best = [f for f in found if f.parent.name == BEST_DIR]
    check_one_run(path, found, "pass one run's folder, or a checkpoint of it")
    if pick == "best":
        if not best:
            raise FileNotFoundError(
                f"no best checkpoint in {str(path)!r} (looked for {BEST_DIR}/{MODEL_FILE} in it and below): a run "
                "keeps one when it validates (train.val_every > 0)"
            )
        return min(best, key=lambda f: (_load(f, mmap=True).get("val_loss", float("inf")), -saved_step(f)))
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    last = [f for f in found if f not in best] or best
    if not last:
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r}: looked for {MODEL_FILE} in it and in every folder below it"
        )
    # Highest step; ties go to the newest file, then the last name.
    return max(last, key=lambda f: (saved_step(f), f.stat().st_mtime, str(f)))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", pick: str = "last"
) -> tuple[TextToMusicLM, ExperimentConfig, int]:
    """Rebuild a saved model in eval mode.

    Args:
        path: a model file, a checkpoint directory holding one, or a folder of checkpoints.
        device: where to put the model.
        pick: in a folder of checkpoints, "last" (highest step) or "best" (lowest validation loss).
    Returns:
        (model, its experiment config, the training step it was saved at).
    """
    file = find_checkpoint(path, pick)
    data = _load(file)
    cfg = ExperimentConfig.from_dict(data["config"])
    model = build_model(cfg.model)
    model.load_state_dict(data["model"], strict=True)
    return model.to(device).eval(), cfg, int(data["step"])


# --- training state ---------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    best_val_loss: float = float("inf")

    def to_dict(self) -> dict:
        return dict(vars(self))


def save_checkpoint(
    directory: Path, model: TextToMusicLM, cfg: ExperimentConfig, opt, sched, state: TrainState, ema: EMA | None = None
) -> None:
    """model.pt gets the weights a user runs (the EMA when it is on); state.pt what the resume needs besides."""
    payload = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": state.to_dict()}
    if ema is not None:
        save_model(directory, model, cfg, state.step, weights=ema.state_dict(model))
        payload["train_model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        save_model(directory, model, cfg, state.step)
    _atomic_save(payload, directory / STATE_FILE)


def load_checkpoint(directory: Path, model: TextToMusicLM, opt, sched, ema: EMA | None = None) -> TrainState:
    """Restore weights, optimizer, schedule and position (weights_only: a checkpoint never runs code).

    No RNG state is kept: the loop seeds every micro-batch from its position (`step.seed_micro_batch`), so a
    resumed worker draws what the uninterrupted run would have, whatever the number of workers.
    """
    handed_out = _load(directory / MODEL_FILE)["model"]
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if "train_model" in saved:  # EMA was on: model.pt holds the average, state.pt the training weights
        model.load_state_dict(saved["train_model"])
        if ema is not None:
            ema.load_state_dict(handed_out)
    else:
        model.load_state_dict(handed_out)
        if ema is not None:  # EMA switched on for this part of the run: it starts from the weights
            ema.load_state_dict(model.state_dict())
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return TrainState(**saved["state"])


def _local_checkpoints(run_dir: str | Path) -> list[Path]:
    """A local-mode run's complete checkpoints (both files written), oldest first."""
    found = Path(run_dir).glob(f"{LOCAL_CHECKPOINT_PREFIX}*")
    return sorted(d for d in found if (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file())


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a training started on `run_dir` continues from a checkpoint: one registered in Ray Train's record
    (`checkpoint_manager_snapshot.json`, what TorchTrainer restores from) or a complete local-mode one."""
    snapshot = Path(run_dir) / RAY_TRAIN_SNAPSHOT
    try:
        if json.loads(snapshot.read_text()).get("checkpoint_results"):
            return True
    except (OSError, ValueError, AttributeError):  # none yet, or being written: nothing to continue from there
        pass
    return bool(_local_checkpoints(run_dir))


def checkpoint_steps(run_dir: str | Path) -> tuple[int | None, int | None]:
    """(the last step of Ray Train's registered checkpoints, of the complete local-mode ones); None where none."""
    try:
        results = json.loads((Path(run_dir) / RAY_TRAIN_SNAPSHOT).read_text()).get("checkpoint_results") or []
        ray_step = max((int(r["metrics"]["step"]) for r in results), default=None)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        ray_step = None
    local = _local_checkpoints(run_dir)
    return ray_step, (int(local[-1].name.removeprefix(LOCAL_CHECKPOINT_PREFIX)) if local else None)


def latest_local_checkpoint(run_dir: str | Path | None):
    """The newest complete local-mode checkpoint of `run_dir` as a `ray.train.Checkpoint`, or None."""
    import ray.train

    found = _local_checkpoints(run_dir) if run_dir else []
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def prune_local_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest local-mode checkpoints (what Ray Train's num_to_keep does for the rest)."""
    for old in _local_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
