"""Training: one loop body (`train_loop_per_worker`) driven by Ray Train's TorchTrainer.

Setup -> train (gradient accumulation, clipping, warm-up + cosine, bf16 autocast on CUDA) -> validate /
generate / checkpoint every N optimizer steps -> cleanup. Rank 0 logs to MLflow. A checkpoint holds the
model (`model.pt`, what `simba-ttm generate` loads) and the training state (`state.pt`: optimizer,
scheduler, step, data position, RNG); Ray Train restarts a crashed run from the latest one.
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from configs.schema import ConfigError, ExperimentConfig, TrainConfig
from modeling.builders import build_model
from modeling.lm import TextToMusicLM
from pipelines.dataset import EpochBatches, collate, count_split, read_split, token_files
from pipelines.runtime import absolute_paths, ensure_ray

STATE_FILE = "state.pt"


# --- pieces of the loop ---------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: TextToMusicLM, t: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decay on matrices only (no decay for norms, biases, embeddings, A_log / D / dt_bias)."""
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
    schedule = partial(lr_factor, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def autocast_dtype(t: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a CUDA device that supports it (precision auto or bf16); fp32 otherwise."""
    if t.precision == "fp32" or device.type != "cuda":
        return None
    if t.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def save_checkpoint(
    directory: Path, model: TextToMusicLM, cfg: ExperimentConfig, opt, sched, state: TrainState
) -> None:
    from pipelines.checkpoints import save_model

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
    from pipelines.checkpoints import MODEL_FILE

    weights = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(weights["model"])
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainState(**saved["state"])


@torch.no_grad()
def validate(model, source: EpochBatches, device: torch.device, amp: torch.dtype | None) -> float:
    """Mean cross-entropy (no label smoothing) over the non-pad tokens of the validation split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for numpy_batch in source.epoch(0):
        batch = collate(numpy_batch, device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(batch["inputs"], batch["text"], batch["text_mask"]).logits
        targets = batch["targets"]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
        )
        keep = targets.reshape(-1) != logits.shape[-1] - 1
        total += float(loss[keep].sum())
        count += float(keep.sum())
    model.train(was_training)
    total, count = _all_reduce([total, count], device)
    return total / max(count, 1.0)


class SampleWriter:
    """Rank 0: generates the fixed prompts, decodes codebook 0 with DAC, logs WAV + spectrogram PNG."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        from modeling.pretrained.codec import load_codec
        from modeling.pretrained.text_encoder import TextEncoder

        p = cfg.preprocess
        self.cfg = cfg
        self.device = device
        self.text_encoder = TextEncoder(p.text_encoder, device=device, setting="preprocess.text_encoder")
        self.codec = load_codec(p.codec, device=device, setting="preprocess.codec")

    def __call__(self, model: TextToMusicLM, step: int, logger) -> None:
        from pipelines.generation import generate_audio, sampling_options, write_samples

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


# --- the loop ---------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. config: {"experiment": cfg.to_dict(), "run_id": str | None, "tracking_uri": str}."""
    import ray.train
    import ray.train.torch

    from pipelines.tracking import RunLogger

    cfg = ExperimentConfig.from_dict(config["experiment"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    amp = autocast_dtype(t, device)

    # --- setup
    raw = build_model(cfg.model).to(device)
    opt, sched = make_optimizer(raw, t)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), raw, opt, sched)
        print(f"[rank {rank}] resumed from step {state.step} (epoch {state.epoch})", file=sys.stderr)
    model = ray.train.torch.prepare_model(raw) if world > 1 else raw
    logger = RunLogger(config["run_id"], config["tracking_uri"]) if rank == 0 and config.get("run_id") else None
    if logger is not None and checkpoint is not None:
        logger.metrics({"resumed_from_step": state.step}, step=state.step)
    sampler = SampleWriter(cfg, device) if rank == 0 and t.generate_every > 0 else None
    train_batches = EpochBatches(ray.train.get_dataset_shard("train"), t.batch_size, seed=t.seed + rank)
    val_batches = None
    if t.val_every > 0:
        val_batches = EpochBatches(ray.train.get_dataset_shard("val"), t.batch_size, drop_last=False)

    def report(metrics: dict, save: bool) -> None:
        if logger is not None:
            logger.metrics(metrics, step=state.step)
        if not save:
            return
        # Every rank reports (a barrier); rank 0 hands over the checkpoint directory.
        tmp = Path(tempfile.mkdtemp(prefix="simba-ckpt-"))
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, raw, cfg, opt, sched, state)
            ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report({"step": state.step, **metrics}, checkpoint=ckpt)
        shutil.rmtree(tmp, ignore_errors=True)

    # --- train
    model.train()
    micro, losses, tokens_seen, bad = 0, [], 0, False
    t_step = time.perf_counter()
    while state.step < t.max_steps:
        for i, numpy_batch in enumerate(train_batches.epoch(state.epoch)):
            if i < state.batches_in_epoch:  # resuming inside an epoch: skip what was consumed
                continue
            batch = collate(numpy_batch, device=device)
            state.batches_in_epoch = i + 1
            last_micro = micro + 1 == t.grad_accum
            sync = last_micro or world == 1
            with model.no_sync() if not sync and hasattr(model, "no_sync") else _null():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    out = model(
                        batch["inputs"],
                        batch["text"],
                        batch["text_mask"],
                        targets=batch["targets"],
                        label_smoothing=t.label_smoothing,
                    )
                loss = out.loss
                if torch.isfinite(loss):
                    (loss / t.grad_accum).backward()
                    losses.append(loss.item())
                else:
                    bad = True
            tokens_seen += int((batch["targets"] != cfg.model.pad_id).sum())
            micro += 1
            if micro < t.grad_accum:
                continue

            # --- one optimizer step
            (bad_any,) = _all_reduce([float(bad)], device)
            if bad_any:
                opt.zero_grad(set_to_none=True)
                state.nonfinite_in_row += 1
                state.nonfinite_total += 1
                if state.nonfinite_in_row > t.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss (step {state.step}); "
                        "lower train.lr or check the data (train.max_nonfinite_steps sets the limit)"
                    )
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    raw.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")
                )
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                state.step += 1
                state.nonfinite_in_row = 0
                elapsed = time.perf_counter() - t_step
                metrics = {
                    "train_loss": sum(losses) / max(len(losses), 1),
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
                    "step_time_s": elapsed,
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "nonfinite_skipped": state.nonfinite_total,
                }
                if val_batches is not None and state.step % t.val_every == 0:
                    metrics["val_loss"] = validate(model, val_batches, device, amp)
                if sampler is not None and (state.step % t.generate_every == 0 or state.step == t.max_steps):
                    sampler(raw, state.step, logger)
                save = state.step % t.checkpoint_every == 0 or state.step == t.max_steps
                report(metrics, save)
            micro, losses, tokens_seen, bad = 0, [], 0, False
            t_step = time.perf_counter()
            if state.step >= t.max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            if state.step == 0 and micro == 0 and not losses:
                raise RuntimeError("the training split produced no batch: is train.batch_size larger than the data?")

    # --- cleanup
    if logger is not None:
        from pipelines.checkpoints import save_model

        with tempfile.TemporaryDirectory() as tmp:
            logger.artifact(save_model(tmp, raw, cfg, state.step), "checkpoint")
        logger.finish()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- the driver -------------------------------------------------------------------------------------------


def check_before_ray(cfg: ExperimentConfig) -> tuple[int, int]:
    """Everything that can be checked without Ray: data present, enough rows. Returns (train, val) rows."""
    token_files(cfg.data.tokens_dir)
    n_train, n_val = count_split(cfg.data.tokens_dir, "train"), count_split(cfg.data.tokens_dir, "val")
    need = cfg.train.batch_size * max(cfg.train.num_workers, 1)
    if n_train < need:
        raise ConfigError(
            f"the training split has {n_train} rows, fewer than train.batch_size x workers = {need}: "
            "preprocess more data or lower train.batch_size"
        )
    return n_train, n_val


def run_training(cfg: ExperimentConfig, *, local_mode: bool = False) -> TrainingOutcome:
    """Train `cfg` on the connected Ray cluster (a local one when none).

    local_mode runs the loop in this process (ScalingConfig(num_workers=0)): fast, no fault tolerance.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import resolve_tracking_uri, start_or_resume_run

    cfg = absolute_paths(cfg)
    n_train, n_val = check_before_ray(cfg)
    if n_val == 0 and cfg.train.val_every > 0:
        print("note: the validation split is empty; validation is skipped (raise data.val_fraction)", file=sys.stderr)
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "val_every": 0}})
    ensure_ray()
    use_gpu = cfg.train.use_gpu and not local_mode
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("train.use_gpu is true but the Ray cluster has no GPU; set train.use_gpu=false for CPUs")

    uri = resolve_tracking_uri(cfg)
    storage = cfg.train.storage_path
    Path(storage).mkdir(parents=True, exist_ok=True)
    resolved = cfg.dump_yaml(Path(storage) / cfg.name / "config.yaml")
    run_id = start_or_resume_run(cfg, str(Path(storage) / cfg.name), uri, config_yaml=resolved)

    datasets = {"train": read_split(cfg.data.tokens_dir, "train", **_split_kwargs(cfg))}
    if cfg.train.val_every > 0:
        datasets["val"] = read_split(cfg.data.tokens_dir, "val", **_split_kwargs(cfg))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ray.train.ScalingConfig(num_workers=0 if local_mode else cfg.train.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets=datasets,
    )
    print(f"training {cfg.model.arch} '{cfg.name}' on {n_train} clips ({n_val} validation); MLflow run {run_id}")
    try:
        result = trainer.fit()
    except Exception:
        from pipelines.tracking import RunLogger

        RunLogger(run_id, uri).finish("FAILED")
        raise
    if result.error is not None:
        raise result.error
    return TrainingOutcome(result=result, run_id=run_id, tracking_uri=uri, config=cfg)


@dataclass
class TrainingOutcome:
    result: object  # ray.train.Result: checkpoint, metrics, path
    run_id: str
    tracking_uri: str
    config: ExperimentConfig


def _split_kwargs(cfg: ExperimentConfig) -> dict:
    return dict(codebook=cfg.data.codebook, max_frames=cfg.data.max_frames, pad_id=cfg.model.pad_id)
