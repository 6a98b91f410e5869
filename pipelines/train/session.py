"""What the training loop asks of whoever runs it: its place among the workers, its device, the checkpoint to
resume from, and where to report metrics and checkpoints.

One loop body, two drivers (DESIGN.md decision 11). `simba-ttm train` runs the loop on Ray Train's workers
(`RayTrainSession`); `simba-ttm tune` runs it as a plain Tune function trainable, one process per trial
(`TuneSession`), not a TorchTrainer inside Tune: on Ray 2.60 that leaks a stopped trial's workers (ray issue
54305). The loop sees only this small interface, so the two drivers cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn


class Checkpoint(Protocol):
    """Ray Train's and Tune's checkpoints alike: a directory the loop reads through `as_directory()`."""

    def as_directory(self): ...


class Session(Protocol):
    rank: int  # this worker among `world`; rank 0 logs to MLflow
    world: int
    device: torch.device

    def get_checkpoint(self) -> Checkpoint | None:
        """The checkpoint this run resumes from (a restart after a crash, or a restored sweep), or None."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as it trains (wrapped for DDP with more than one worker)."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand over metrics, and on rank 0 a checkpoint directory, which the driver copies into its storage."""


class RayTrainSession:
    """A Ray Train worker (TorchTrainer, or its in-process local mode)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self) -> Checkpoint | None:
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        # A barrier on every worker; only rank 0 passes a checkpoint.
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """A Tune trial: one process, one worker, on the GPU Tune gave it (CUDA_VISIBLE_DEVICES) or on the CPU."""

    rank = 0
    world = 1

    def __init__(self, use_gpu: bool) -> None:
        self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def get_checkpoint(self) -> Checkpoint | None:
        from ray import tune

        return tune.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=checkpoint)
