"""Checkpoint files: `model.pt` (shared by training, generation and evaluation) and the training state.

A training checkpoint is a directory with `model.pt` and `state.pt` (optimizer, scheduler, `TrainState`, RNG);
Ray Train restarts a crashed run from the latest one (`save_checkpoint` / `load_checkpoint`).

`model.pt` is a plain `torch.save` of {"format", "model" (state dict on CPU), "config" (ExperimentConfig as
nested dicts), "step"}: only tensors and YAML-safe values, so it always loads with `weights_only=True` and a
checkpoint can never run code on the machine that opens it. The config travels with the weights, so a
checkpoint rebuilds its own model without the YAML it was trained from.

A checkpoint can be named by the file, by the directory holding it (a Ray Train checkpoint), or by any
folder above (a Ray Train run folder): the latter resolves to the checkpoint with the highest saved step.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs.schema import ExperimentConfig
from modeling.builders import build_model
from modeling.lm import TextToMusicLM

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
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


def save_model(directory: str | Path, model: nn.Module, cfg: ExperimentConfig, step: int) -> Path:
    """Write `directory/model.pt` atomically (temporary file + rename): a reader never sees half a file.

    Returns:
        the path of the written file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {"format": FORMAT, "model": state, "config": cfg.to_dict(), "step": int(step)}
    final = directory / MODEL_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _load(file: Path, mmap: bool = False) -> dict:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers: this file holds code objects.
        raise ValueError(f"{file}: refusing to load, it holds more than tensors and plain values:\n{e}") from e
    if not isinstance(data, dict) or not {"format", "model", "config", "step"} <= data.keys():
        raise ValueError(f"{file} is not a simba-ttm checkpoint (expected keys format, model, config, step)")
    if data["format"] != FORMAT:
        raise ValueError(f"{file}: checkpoint format {data['format']!r} is not supported (this code reads {FORMAT})")
    return data


def saved_step(file: str | Path) -> int:
    """The training step stored in a model file; memory-mapped, so the weights are not read."""
    return int(_load(Path(file), mmap=True)["step"])


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a file, a checkpoint directory or a run folder to one model file (the highest step wins).

    Raises:
        FileNotFoundError naming the places searched.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    # Nested checkpoints (Ray Train's checkpoint_* folders); skip hidden folders, where partial writes live.
    found = [f for f in path.rglob(MODEL_FILE) if not any(p.startswith(".") for p in f.relative_to(path).parts)]
    if not found:
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r}: looked for {MODEL_FILE} in it and in every folder below it"
        )
    # Highest step; ties go to the newest file, then the last name.
    return max(found, key=lambda f: (saved_step(f), f.stat().st_mtime, str(f)))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TextToMusicLM, ExperimentConfig, int]:
    """Rebuild a saved model in eval mode.

    Args:
        path: a model file, a checkpoint directory holding one, or a folder of checkpoints (highest step wins).
        device: where to put the model.
    Returns:
        (model, its experiment config, the training step it was saved at).
    """
    file = find_checkpoint(path)
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

    def to_dict(self) -> dict:
        return dict(vars(self))


def save_checkpoint(
    directory: Path, model: TextToMusicLM, cfg: ExperimentConfig, opt, sched, state: TrainState
) -> None:
    save_model(directory, model, cfg, state.step)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": state.to_dict(), "rng": rng},
        directory / STATE_FILE,
    )


def load_checkpoint(directory: Path, model: TextToMusicLM, opt, sched) -> TrainState:
    """Restore weights, optimizer, schedule and RNG (weights_only: a checkpoint never runs code)."""
    model.load_state_dict(_load(directory / MODEL_FILE)["model"])
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainState(**saved["state"])
