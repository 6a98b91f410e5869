"""The training loop: one recipe that Ray Train runs on every worker (`train_loop_per_worker`) and Ray Tune runs
as each trial of a sweep (`pipelines.train.sweep.tune_trial`); the few calls that differ are a `Session`.

It reads as a recipe, top to bottom: setup (seed, model, optimizer, resume from the session's checkpoint, data
shards, MLflow logger) -> train (gradient accumulation, clipping, warm-up + cosine, bf16 autocast on CUDA;
validate / generate / checkpoint every N optimizer steps) -> save (the final model, to MLflow) -> cleanup.
Rank 0 logs to MLflow. A checkpoint holds the model (`model.pt`, what `simba-ttm generate` loads) and the
training state (`state.pt`: optimizer, scheduler, step, data position); Ray Train restarts a crashed run
from the latest one. Checkpoint I/O, validation and samples live in their own modules.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from configs.schema import ExperimentConfig
from eval.evaluate import EVAL_CHECKPOINT_DIR, PeriodicEvaluator
from modeling.builders import build_model
from pipelines.train.checkpoints import (
    BEST_DIR,
    LOCAL_CHECKPOINT_PREFIX,
    MODEL_FILE,
    TrainState,
    latest_local_checkpoint,
    load_checkpoint,
    prune_local_checkpoints,
    save_checkpoint,
    save_model,
    saved_step,
)
from pipelines.train.dataset import EpochBatches, TokenSplit, collate, describe_splits
from pipelines.train.distributed import replica_spread, shard_overlap
from pipelines.train.ema import EMA
from pipelines.train.optim import autocast_dtype, clip_and_step, make_optimizer
from pipelines.train.progress import Progress, peak_flops, train_flops_per_token
from pipelines.train.samples import SampleWriter
from pipelines.train.session import RayTrainSession, Session
from pipelines.train.step import StepStats, micro_batch_backward, scale_to_token_mean, seed_micro_batch
from pipelines.train.tracking import RunLogger
from pipelines.train.validation import validate


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. config: {"experiment": cfg.to_dict(), "run_id", "tracking_uri", "run_dir",
    "local_mode"} (see `driver.run_training`)."""
    run_recipe(TrainRecipe(config, RayTrainSession()))


def run_recipe(recipe: TrainRecipe) -> None:
    """The loop body both drivers run: Ray Train's workers (above) and Tune's trials (`sweep.tune_trial`)."""
    with recipe.timed("setup"):
        recipe.setup()
    recipe.train()
    recipe.save_final_model()
    recipe.cleanup()


def say(line: str) -> None:
    """One line to the worker's stdout. Not `print`: Ray Train patches it to log as well as print, and a
    worker's line would reach the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrainRecipe:
    """One worker's training run; `run_recipe` calls its steps in order.

    config: {"experiment": cfg.to_dict(), "run_id", "tracking_uri", "run_dir", "local_mode", "log_final_model"}
    session: who runs it (Ray Train or Tune): rank, device, the checkpoint to resume from, where reports go.
    """

    def __init__(self, config: dict, session: Session):
        self.config = config
        self.session = session
        self.cfg = ExperimentConfig.from_dict(config["experiment"])
        self.seconds: dict[str, float] = defaultdict(float)  # wall time by part, in every checkpoint's report

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    # --- setup ----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.rank, self.world, self.device = self.session.rank, self.session.world, self.session.device
        self.amp = autocast_dtype(t, self.device)

        torch.manual_seed(t.seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
        self.raw = build_model(cfg.model).to(self.device)
        self.opt, self.sched = make_optimizer(self.raw, t)
        self.ema = EMA(self.raw, t.ema_decay) if t.ema_decay > 0 else None
        self.state = TrainState()
        self.run_dir = Path(self.config["run_dir"]) if self.config.get("run_dir") else None
        self.local_mode = bool(self.config.get("local_mode"))
        checkpoint = self.session.get_checkpoint()
        if self.local_mode:  # Ray Train does not keep local-mode checkpoints, we do: the newer one continues
            local = latest_local_checkpoint(self.run_dir)
            if local is not None and (checkpoint is None or _saved_step(local) > _saved_step(checkpoint)):
                checkpoint = local
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.state = load_checkpoint(Path(d), self.raw, self.opt, self.sched, self.ema)
            say(f"[rank {self.rank}] resumed from step {self.state.step} (epoch {self.state.epoch})")
        self.model = self.session.prepare_model(self.raw)

        config = self.config
        self.logger = (
            RunLogger(config["run_id"], config["tracking_uri"]) if self.rank == 0 and config.get("run_id") else None
        )
        if self.logger is not None and checkpoint is not None:
            self.logger.metrics({"resumed_from_step": self.state.step}, step=self.state.step)
        self.sampler = SampleWriter(cfg, self.device) if self.rank == 0 and t.generate_every > 0 else None
        self.evaluator = None
        if self.rank == 0 and t.eval_every > 0:  # the other workers wait for it at the next step's all-reduce
            self.evaluator = PeriodicEvaluator(cfg, self.device, self.run_dir)
        read = dict(codebook=cfg.data.codebook, max_frames=cfg.data.max_frames, pad_id=cfg.model.pad_id)
        shard = dict(rank=self.rank, world=self.world)
        train_split = TokenSplit.read(cfg.data.tokens_dir, "train", **read)
        self.train_batches = EpochBatches(train_split, t.batch_size, seed=t.seed, **shard)
        self.val_batches, val_split = None, None
        if t.val_every > 0:
            val_split = TokenSplit.read(cfg.data.tokens_dir, "val", **read)
            self.val_batches = EpochBatches(val_split, t.batch_size, shuffle=False, drop_last=False, **shard)
        if self.rank == 0:
            say(describe_splits(cfg.data.tokens_dir, train_split, val_split))
        # Rows this worker consumed in the current epoch (those before a resume included): checked for overlap
        # between workers at every checkpoint.
        done = self.state.batches_in_epoch * t.batch_size
        self.consumed = list(self.train_batches.rows(self.state.epoch)[:done])

        peak, source = peak_flops(cfg, self.device, self.amp)
        self.progress = Progress(
            cfg.name, t.max_steps, train_flops_per_token(cfg, self.raw), peak * self.world, self.state.step
        )
        if self.rank == 0:
            say(f"MFU against {peak / 1e12:.2f} TFLOP/s per worker ({source}) x {self.world} worker(s)")

    # --- train ----------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        model, raw, opt, sched = self.model, self.raw, self.opt, self.sched
        device, amp, world = self.device, self.amp, self.world
        model.train()
        micro, stats = 0, StepStats()
        t_step = time.perf_counter()
        while state.step < t.max_steps:
            for numpy_batch in self.train_batches.epoch(state.epoch, start=state.batches_in_epoch):
                state.batches_in_epoch += 1
                self.consumed += numpy_batch["index"].tolist()
                micro += 1
                # Dropout and condition dropout draw from a generator seeded by (seed, worker, step, micro-batch):
                # the same masks in a rerun and after a resume, whatever else (sampling, validation) drew in between.
                seed_micro_batch(t.seed, self.rank, state.step, micro)
                micro_batch_backward(
                    model,
                    collate(numpy_batch, device=device),
                    stats,
                    pad_id=cfg.model.pad_id,
                    label_smoothing=t.label_smoothing,
                    amp=amp,
                    sync=micro == t.grad_accum or world == 1,
                )
                if micro < t.grad_accum:
                    continue

                # --- one optimizer step: the per-token mean over all micro-batches and workers
                step = stats.reduced(device)
                scale_to_token_mean(raw.parameters(), step, world)
                lr = sched.get_last_lr()[0]  # what this step uses: clip_and_step advances the schedule
                grad_norm = clip_and_step(raw.parameters(), opt, sched, t.grad_clip, skip=step.nonfinite)
                if grad_norm is None:
                    self._skip_nonfinite_step()
                else:
                    state.step += 1
                    state.nonfinite_in_row = 0
                    if self.ema is not None:
                        self.ema.update(raw)
                    elapsed = time.perf_counter() - t_step
                    self.seconds["steps"] += elapsed
                    tokens_per_s = step.tokens / max(elapsed, 1e-9)  # over all workers
                    metrics = {
                        "train_loss": step.mean_loss,  # over all workers
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "mfu": self.progress.mfu(tokens_per_s),
                        "step_time_s": elapsed,
                        "peak_memory_bytes": peak_memory_bytes(device),
                        "nonfinite_skipped": state.nonfinite_total,
                    }
                    self._after_step(metrics)
                micro, stats = 0, StepStats()
                t_step = time.perf_counter()
                if state.step >= t.max_steps:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                self.consumed = []

    def _skip_nonfinite_step(self) -> None:
        """Some worker's loss, or the gradient norm, was not finite: count it; too many in a row stop the run."""
        t, state = self.cfg.train, self.state
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        if state.nonfinite_in_row > t.max_nonfinite_steps:
            raise RuntimeError(
                f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(step {state.step}); lower train.lr or check the data (train.max_nonfinite_steps sets the limit)"
            )

    def _handed_out(self) -> contextlib.AbstractContextManager:
        """The weights a user gets (validation, samples, best/): the EMA when it is on, else the model's own."""
        return self.ema.applied(self.raw) if self.ema is not None else contextlib.nullcontext(self.raw)

    def _after_step(self, metrics: dict) -> None:
        """Validate (keeping the best model), generate samples and checkpoint when their intervals say so; report
        the step's metrics; print the progress line."""
        t, state = self.cfg.train, self.state
        save = state.step % t.checkpoint_every == 0 or state.step == t.max_steps
        # Every checkpoint carries the validation loss of its weights: a Tune scheduler or searcher deciding on
        # val_loss gets it with each report, whether or not train.val_every divides the checkpoint steps.
        if self.val_batches is not None and (state.step % t.val_every == 0 or save):
            with self._handed_out() as model, self.timed("validation"):
                metrics["val_loss"] = validate(model, self.val_batches, self.device, self.amp)
                if metrics["val_loss"] < state.best_val_loss:  # the same value on every worker (all-reduced)
                    state.best_val_loss = metrics["val_loss"]
                    if self.rank == 0 and self.run_dir is not None:
                        save_model(self.run_dir / BEST_DIR, model, self.cfg, state.step, val_loss=metrics["val_loss"])
        if self.sampler is not None and (state.step % t.generate_every == 0 or state.step == t.max_steps):
            with self._handed_out() as model, self.timed("samples"):
                self.sampler(model, state.step, self.logger)
        if self.evaluator is not None and state.step % t.eval_every == 0:
            with self._handed_out() as model, self.timed("evaluation"):
                scores = self.evaluator(model, state.step, self.logger)  # logged with the clips, at this step
            say(f"[{self.cfg.name}] step {state.step} eval: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if self.rank == 0 and self.run_dir is not None and t.eval_checkpoint_every > 0:
            if state.step % t.eval_checkpoint_every == 0:  # weights only, never pruned: for `evaluate --run`
                with self._handed_out() as model, self.timed("checkpoints"):
                    save_model(
                        self.run_dir / EVAL_CHECKPOINT_DIR / f"step_{state.step:06d}", model, self.cfg, state.step
                    )
        if self.rank == 0 and (state.step % t.log_every == 0 or state.step == t.max_steps):
            say(self.progress.line(state.step, metrics))
        self._report(metrics, save)

    def _report(self, metrics: dict, save: bool) -> None:
        if save:  # DDP keeps the replicas identical; each checkpoint checks it (every rank takes part)
            metrics["replica_param_spread"] = replica_spread(self.raw, self.device)
            if self.world > 1:  # ... and that no two workers trained on the same row this epoch
                metrics["shard_overlap_rows"] = shard_overlap(self.consumed)
        if self.logger is not None:
            self.logger.metrics(metrics, step=self.state.step)
        seconds = {f"seconds_{part}": value for part, value in self.seconds.items()}
        if not save:
            if "val_loss" in metrics:  # every validation reaches the driver: a Tune scheduler decides on it
                self.session.report({"step": self.state.step, **metrics, **seconds}, None)
            return
        # Every rank reports (a barrier); rank 0 hands over the checkpoint directory, which the driver copies
        # into the run folder. In local mode nothing is copied: the checkpoint is written there directly.
        if self.local_mode and self.run_dir is not None:
            directory = self.run_dir / f"{LOCAL_CHECKPOINT_PREFIX}{self.state.step:06d}"
        else:
            directory = Path(tempfile.mkdtemp(prefix="simba-ckpt-"))
        t0 = time.perf_counter()
        if self.rank == 0:
            save_checkpoint(directory, self.raw, self.cfg, self.opt, self.sched, self.state, self.ema)
        self.session.report({"step": self.state.step, **metrics, **seconds}, directory if self.rank == 0 else None)
        self.seconds["checkpoints"] += time.perf_counter() - t0
        if self.local_mode and self.run_dir is not None:
            prune_local_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    # --- save -----------------------------------------------------------------------------------------------

    def save_final_model(self) -> None:
        """Rank 0 logs the final weights to the MLflow run as `checkpoint/model.pt` (a sweep's trials do not: their
        checkpoints stay in the sweep's folder, and `best.yaml` retrains the winner)."""
        if self.logger is not None and self.config.get("log_final_model", True):
            with tempfile.TemporaryDirectory() as tmp, self._handed_out() as model:
                self.logger.artifact(save_model(tmp, model, self.cfg, self.state.step), "checkpoint")

    # --- cleanup --------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.finish()


def _saved_step(checkpoint) -> int:
    """The optimizer step a `ray.train.Checkpoint` of this loop was saved at."""
    with checkpoint.as_directory() as d:
        return saved_step(Path(d) / MODEL_FILE)
