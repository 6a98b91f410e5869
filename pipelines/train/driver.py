"""The training driver: checks, the MLflow run, and Ray Train's TorchTrainer around `train_loop_per_worker`.

`check_before_ray` answers what can be known without Ray (data present, enough rows, a run folder whose
checkpoints these settings can continue); `run_training` resolves
paths, finds or creates the MLflow run (a restart continues it) and fits the TorchTrainer, which restarts a
crashed worker group from the latest checkpoint. Each worker reads the token splits itself
(`dataset.TokenSplit`), so the data order is a function of the seed and the position alone.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from configs.schema import ConfigError, ExperimentConfig
from pipelines.paths import absolute_paths
from pipelines.preprocess.tokens import PART_GLOB
from pipelines.runtime import ensure_ray
from pipelines.train.checkpoints import has_checkpoint
from pipelines.train.dataset import count_split, token_files
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.tracking import RunLogger, resolve_tracking_uri, start_or_resume_run


@dataclass
class TrainingOutcome:
    result: object  # ray.train.Result: checkpoint, metrics, path
    run_id: str
    tracking_uri: str
    config: ExperimentConfig

    @property
    def checkpoint(self) -> Path | None:
        """The run's newest training checkpoint folder: the one this call reported, else the newest `checkpoint_*` on
        disk (a finished run started again reports none: it has no step left to take), else None."""
        from pipelines.train.checkpoints import MODEL_FILE, saved_step

        if self.result.checkpoint is not None:
            return Path(self.result.checkpoint.path)
        found = [d for d in self.config.run_dir.glob("checkpoint_*") if (d / MODEL_FILE).is_file()]
        try:
            return max(found, key=lambda d: (saved_step(d / MODEL_FILE), d.name), default=None)
        except ValueError:  # a damaged model file: the run is done, only the name is missing
            return None


def check_before_ray(cfg: ExperimentConfig, local_mode: bool = False) -> tuple[int, int]:
    """Everything that can be checked without Ray: data present, enough rows, training's own evaluation, and that a
    run folder with checkpoints can be continued (`check_resumable`). Returns (train, val) rows."""
    token_files(cfg.data.tokens_dir)
    n_train, n_val = count_split(cfg.data.tokens_dir, "train"), count_split(cfg.data.tokens_dir, "val")
    need = cfg.train.batch_size * max(cfg.train.num_workers, 1)
    if n_train < need:
        raise ConfigError(
            f"the training split has {n_train} rows, fewer than train.batch_size x workers = {need}: "
            "preprocess more data or lower train.batch_size"
        )
    if cfg.train.eval_every > 0:
        check_periodic_evaluation(cfg)
    if has_checkpoint(cfg.run_dir):
        check_resumable(cfg, cfg.run_dir, local_mode)
    return n_train, n_val


def check_periodic_evaluation(cfg: ExperimentConfig) -> None:
    """What `train.eval_every` needs, checked before the workers start: the eval set, settings it can be scored
    with, and the scoring models' weights (ConfigError or MissingWeightsError naming the setting)."""
    from eval.evaluate import check_evalset
    from eval.scoring import check_weights
    from pipelines.preprocess.evalset import read_evalset

    if not any(Path(cfg.eval.set_dir).glob(PART_GLOB)):
        raise ConfigError(
            f"train.eval_every={cfg.train.eval_every} evaluates on the eval set, but {cfg.eval.set_dir} holds none: "
            "write it with `simba-ttm make-evalset --config FILE`, point eval.set_dir at one, or set train.eval_every=0"
        )
    try:
        check_evalset(cfg.eval, read_evalset(cfg.eval.set_dir, cfg.eval.limit), cfg.eval.set_dir)
    except ValueError as err:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}: {err}") from err
    check_weights(cfg.eval)


# What a training continued from its run folder's checkpoint may change: how long it runs, how often it checkpoints,
# validates, samples and evaluates, where it runs (precision, GPU) and EMA (switched on or off at the resume). Any
# other train, model or data setting changes what the checkpoint's weights, optimizer state or data position mean.
RESUMABLE_CHANGES = {f"train.{k}" for k in (
    "max_steps", "checkpoint_every", "keep_checkpoints", "val_every", "generate_every", "max_nonfinite_steps",
    "max_failures", "log_every", "peak_tflops", "eval_every", "eval_checkpoint_every", "use_gpu", "precision",
    "ema_decay", "storage_path",
)} | {f"data.{k}" for k in ("tokens_dir", "split", "split_file", "val_fraction", "seed")}  # fmt: skip
# (the split settings are preprocessing's: training reads each row's stored split)
CHECKED_SECTIONS = ("model.", "data.", "train.")


def check_resumable(cfg: ExperimentConfig, run_dir: Path, local_mode: bool) -> None:
    """Refuse to continue `run_dir` (which holds checkpoints) with settings its checkpoints cannot continue, or from
    an older checkpoint than the newest (which would log its steps to MLflow a second time)."""
    from configs import changes, load_config
    from pipelines.train.checkpoints import checkpoint_steps

    saved_file = run_dir / "config.yaml"
    try:
        saved = load_config(saved_file).to_dict() if saved_file.is_file() else None
    except ConfigError as err:  # written by an earlier version that accepted other values: nothing to compare
        print(f"note: {saved_file} no longer reads ({err}); its settings are not compared", file=sys.stderr)
        saved = None
    if saved is not None:
        checked = lambda k: k.startswith(CHECKED_SECTIONS) and k not in RESUMABLE_CHANGES  # noqa: E731
        changed = changes(saved, cfg.to_dict(), checked)
        if changed:
            raise ConfigError(
                f"{run_dir} continues from its checkpoints, which were trained with other settings:\n  "
                + "\n  ".join(changed)
                + f"\ntrain with the settings in {saved_file}, or under a new name (name=...) to start a new run"
            )
    ray_step, local_step = checkpoint_steps(run_dir)
    if not local_mode and local_step is not None and (ray_step is None or local_step > ray_step):
        since = f"Ray Train's last checkpoint, step {ray_step}" if ray_step is not None else "step 0"
        raise ConfigError(
            f"{run_dir} was trained in local mode (--local-mode) up to step {local_step}; Ray Train would continue "
            f"from {since} and log those steps again: continue with --local-mode, or train under a new name"
        )


def run_training(cfg: ExperimentConfig, *, local_mode: bool = False) -> TrainingOutcome:
    """Train `cfg` on the connected Ray cluster (a local one when none).

    local_mode runs the loop in this process (ScalingConfig(num_workers=0)): fast, no restart after a crash.
    Ray Train does not persist a local-mode checkpoint, so the loop writes them into the run folder itself
    (`checkpoint_local_<step>`) and a local-mode run started again continues from the latest.
    """
    cfg = absolute_paths(cfg)
    n_train, n_val = check_before_ray(cfg, local_mode=local_mode)
    if n_val == 0 and cfg.train.val_every > 0:
        print("note: the validation split is empty; validation is skipped (raise data.val_fraction)", file=sys.stderr)
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "val_every": 0}})
    ensure_ray()
    use_gpu = cfg.train.use_gpu and not local_mode
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("train.use_gpu is true but the Ray cluster has no GPU; set train.use_gpu=false for CPUs")

    uri = resolve_tracking_uri(cfg)
    # The store as resolved here goes into config.yaml and every checkpoint: `simba-ttm evaluate` finds the run
    # from anywhere, rather than resolving an unset or relative URI against its own working directory.
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri))
    storage, run_dir = cfg.train.storage_path, cfg.run_dir
    Path(storage).mkdir(parents=True, exist_ok=True)
    resume = has_checkpoint(run_dir)  # else a new MLflow run: a deleted run folder starts a new history
    resolved = cfg.dump_yaml(run_dir / "config.yaml")
    run_id = start_or_resume_run(cfg, str(run_dir), uri, config_yaml=resolved, resume=resume)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.to_dict(),
            "run_id": run_id,
            "tracking_uri": uri,
            "run_dir": str(run_dir),  # where best/ (and local-mode checkpoints) go
            "local_mode": local_mode,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=0 if local_mode else cfg.train.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    print(f"training {cfg.model.arch} '{cfg.name}' on {n_train} clips ({n_val} validation); MLflow run {run_id}")
    try:
        result = trainer.fit()
    except Exception:
        RunLogger(run_id, uri).finish("FAILED")
        raise
    if result.error is not None:
        raise result.error
    return TrainingOutcome(result=result, run_id=run_id, tracking_uri=uri, config=cfg)
