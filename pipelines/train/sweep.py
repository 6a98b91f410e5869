"""The Tune driver: a hyperparameter search whose trials run the training loop, recorded in MLflow.

`run_sweep(cfg)` turns `cfg.tune` into a Ray Tune search (random or Optuna TPE, ASHA or no scheduler) over
`tune_trial`: a plain Tune function trainable that runs the same `TrainRecipe` as `simba-ttm train`, through a
`TuneSession` (one process per trial; a TorchTrainer inside Tune leaks a stopped trial's workers on Ray 2.60).
Each trial reads the token Parquet itself, as a training worker does: no trial reruns preprocessing.

MLflow: the sweep is one parent run (config, search space and scheduler as params; `results.csv`, `best.yaml`
and plots as artifacts); every trial is its own run tagged `mlflow.parentRunId` = the sweep's, with its full
config as params and every step's metrics. A killed sweep continues with `resume=True` (`Tuner.restore`): the
finished trials are kept, the others continue from their checkpoints, in the same MLflow runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configs.schema import ConfigError, ExperimentConfig
from pipelines.train.tracking import RunLogger, resolve_tracking_uri, start_or_resume_run

PARENT_TAG = "mlflow.parentRunId"  # the MLflow UI nests a run under the run this names
TRIAL_TAG = "simba_ttm.trial_id"
STOPPED_EARLY_TAG = "simba_ttm.stopped_early"
ERROR_TAG = "simba_ttm.error"
TRIAL_PREFIX = "trial_"
RESULTS_CSV = "results.csv"
BEST_YAML = "best.yaml"


# --------------------------------------------------------------------------------------------------
# The search space and the trials' configs


def search_space(space: dict[str, list]) -> dict[str, Any]:
    """`tune.space` as Ray Tune domains, keyed by the dotted config key."""
    from ray import tune

    domains = {
        "choice": lambda *values: tune.choice(list(values)),
        "grid": lambda *values: tune.grid_search(list(values)),
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
    }
    return {key: domains[kind](*args) for key, (kind, *args) in space.items()}


def _plain(value: Any) -> Any:
    """A sampled value as a YAML-safe Python value (Tune may hand out numpy scalars)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def trial_config(experiment: dict, params: dict[str, Any], name: str) -> ExperimentConfig:
    """The sweep's config with a trial's sampled values put in, under the trial's name."""
    d = copy.deepcopy(experiment)
    for key, value in params.items():
        section, field = key.split(".")
        d[section][field] = _plain(value)
    d["name"] = name
    return ExperimentConfig.from_dict(d)


def on_one_worker(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` for a trial, which trains in one process: `train.num_workers` folds into `train.grad_accum`, so the
    trial steps with the effective batch that `best.yaml` (which keeps both) trains with."""
    t = cfg.train
    train = dataclasses.replace(t, grad_accum=t.grad_accum * t.num_workers, num_workers=1)
    return dataclasses.replace(cfg, train=train)


# --------------------------------------------------------------------------------------------------
# The trainable: the training loop as one Tune trial


def tune_trial(params: dict[str, Any], sweep: dict) -> None:
    """One trial: the sweep's config with `params` put in, trained by the same recipe as `simba-ttm train`.

    sweep: {"experiment": the sweep's config as dicts, "parent_run_id", "tracking_uri", "storage" (the sweep's
    folder), "use_gpu"}.
    """
    from ray import tune

    from pipelines.train.loop import TrainRecipe, run_recipe
    from pipelines.train.session import TuneSession

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = on_one_worker(trial_config(sweep["experiment"], params, f"{sweep['experiment']['name']}-{trial_id}"))
    run_dir = Path(sweep["storage"]) / f"{TRIAL_PREFIX}{trial_id}"  # Tune's folder of the trial (storage_path is local)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump_yaml(run_dir / "config.yaml")  # what it trains with; makes the folder a run folder (`run_folder`)
    tags = {PARENT_TAG: sweep["parent_run_id"], TRIAL_TAG: trial_id}
    run_id = start_or_resume_run(cfg, sweep["storage"], sweep["tracking_uri"], tags=tags)
    config = {
        "experiment": cfg.to_dict(),
        "run_id": run_id,
        "tracking_uri": sweep["tracking_uri"],
        "run_dir": str(run_dir),  # best/ goes beside the trial's checkpoints
        "local_mode": False,
        "log_final_model": False,  # the trial's checkpoints stay in the sweep folder; best.yaml retrains the winner
    }
    try:
        run_recipe(TrainRecipe(config, TuneSession(sweep["use_gpu"])))
    except Exception as e:
        record_failure(RunLogger(run_id, sweep["tracking_uri"]), e)
        raise


def record_failure(logger: RunLogger, error: BaseException) -> None:
    """A crashed trial's MLflow run: FAILED, the error as a tag and the traceback as `error.txt`."""
    text = "".join(traceback.format_exception(error))
    logger.client.set_tag(logger.run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
    logger.client.log_text(logger.run_id, text, "error.txt")
    logger.finish("FAILED")


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrialRow:
    """One line of the ranked table."""

    trial_id: str
    status: str  # TERMINATED or ERROR
    params: dict[str, Any]
    metric: float  # the last reported value of tune.metric (nan when none)
    steps: int  # optimizer steps the trial ran
    stopped_early: bool
    error: str = ""
    run_id: str | None = None


@dataclass
class SweepOutcome:
    rows: list[TrialRow]  # ranked, best first
    best: ExperimentConfig | None
    best_yaml: Path | None
    parent_run_id: str
    tracking_uri: str
    path: Path  # the sweep's folder (Tune's experiment folder)


def check_sweep(cfg: ExperimentConfig, resume: bool) -> None:
    """What can be known before Ray starts: a space to search, a metric the trials report, data, the folder."""
    from ray import tune

    from pipelines.train.driver import check_before_ray

    tc = cfg.tune
    if not tc.space:
        raise ConfigError(
            "tune.space is empty: name at least one key to search, e.g. train.lr: [loguniform, 3e-5, 3e-4]"
        )
    cfg.check_space_combinations()
    _, n_val = check_before_ray(cfg)
    if tc.metric == "val_loss" and (cfg.train.val_every == 0 or n_val == 0):
        raise ConfigError(
            "tune.metric is val_loss, but the trials never validate: set train.val_every > 0 and keep a validation "
            f"split (it has {n_val} rows; data.val_fraction raises it), or use tune.metric=train_loss"
        )
    if tc.scheduler == "asha" and tc.grace_period > cfg.train.max_steps:
        raise ConfigError(
            f"tune.grace_period ({tc.grace_period}) exceeds train.max_steps ({cfg.train.max_steps}): "
            "ASHA could stop nothing"
        )
    path = cfg.run_dir
    exists = tune.Tuner.can_restore(str(path)) if path.exists() else False
    if resume and not exists:
        raise ConfigError(f"nothing to resume: no sweep in {path} (train.storage_path / name)")
    if resume and (path / "config.yaml").is_file():  # Tune restores its space and scheduler, the trials this base
        from configs import changes, load_config

        changed = changes(load_config(path / "config.yaml").to_dict(), cfg.to_dict())
        if changed:
            raise ConfigError(
                f"the sweep in {path} ran with other settings; --resume continues it with its own:\n  "
                + "\n  ".join(changed)
                + f"\nresume with the settings in {path / 'config.yaml'}, or start a new sweep (name=...)"
            )
    if not resume and exists:
        raise ConfigError(f"a sweep named {cfg.name!r} exists in {path}: continue it with --resume, or set name=...")


def run_sweep(cfg: ExperimentConfig, *, resume: bool = False) -> SweepOutcome:
    """Search `cfg.tune.space` on the connected Ray cluster (a local one when none); see the module docstring."""
    import ray
    from ray import tune

    from pipelines.paths import absolute_paths
    from pipelines.runtime import ensure_ray

    cfg = absolute_paths(cfg)
    check_sweep(cfg, resume)
    tc = cfg.tune
    ensure_ray()
    resources = {k: v for k, v in tc.resources_per_trial.items() if v > 0}
    cluster = ray.cluster_resources()
    for name, key in (("cpu", "CPU"), ("gpu", "GPU")):
        if resources.get(name, 0) > cluster.get(key, 0):
            raise ConfigError(
                f"tune.resources_per_trial.{name} = {resources[name]} but the Ray cluster has {cluster.get(key, 0)} "
                f"{key}s: no trial could start (on a CPU machine: tune.resources_per_trial={{cpu: 1, gpu: 0}})"
            )

    uri = resolve_tracking_uri(cfg)
    path = cfg.run_dir
    path.mkdir(parents=True, exist_ok=True)
    resolved = cfg.dump_yaml(path / "config.yaml")
    # Not resuming, the folder held no sweep (check_sweep): a new parent run, as a training in a deleted folder gets.
    tags = {"simba_ttm.kind": "sweep"}
    parent = start_or_resume_run(cfg, str(path), uri, config_yaml=resolved, tags=tags, resume=resume)
    logger = RunLogger(parent, uri)
    if not resume:
        _log_search(logger, cfg)

    sweep = {"experiment": cfg.to_dict(), "parent_run_id": parent, "tracking_uri": uri, "storage": str(path),
             "use_gpu": resources.get("gpu", 0) > 0}  # fmt: skip
    trainable = tune.with_resources(tune.with_parameters(tune_trial, sweep=sweep), resources)
    if resume:
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tc.space),
            tune_config=tune.TuneConfig(
                metric=tc.metric,
                mode=tc.mode,
                num_samples=tc.num_samples,
                # random search: the generator limits itself (see _searcher); optuna: Ray wraps it in a limiter
                max_concurrent_trials=(tc.max_concurrent_trials or None) if tc.search == "optuna" else None,
                scheduler=_scheduler(cfg),
                search_alg=_searcher(cfg),
                trial_name_creator=lambda trial: f"{TRIAL_PREFIX}{trial.trial_id}",
                trial_dirname_creator=lambda trial: f"{TRIAL_PREFIX}{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=str(path.parent),
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                verbose=1,
            ),
        )
    print(f"sweep '{cfg.name}': {tc.num_samples} trial(s) over {', '.join(tc.space)}; MLflow parent run {parent}")
    try:
        grid = tuner.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    rows = _rows(grid, cfg, uri, parent)
    best = trial_config(cfg.to_dict(), rows[0].params, f"{cfg.name}-best") if rows and _ok(rows[0]) else None
    best_yaml = best.dump_yaml(path / BEST_YAML) if best is not None else None
    _log_results(logger, cfg, rows, best_yaml, path)
    logger.finish("FINISHED" if best is not None else "FAILED")
    return SweepOutcome(rows, best, best_yaml, parent, uri, path)


def _scheduler(cfg: ExperimentConfig):
    from ray.tune.schedulers import ASHAScheduler

    if cfg.tune.scheduler == "none":
        return None
    # Time is counted in optimizer steps (the `step` every report carries), so the rungs are steps too.
    return ASHAScheduler(
        time_attr="step",
        max_t=cfg.train.max_steps,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def _searcher(cfg: ExperimentConfig):
    """Random samples (and every grid point) drawn from tune.seed, or Optuna's TPE seeded by it.

    The random generator limits concurrency itself: Ray ignores TuneConfig.max_concurrent_trials (with a log line
    only) when the search algorithm is a generator instance, and would run every trial at once."""
    if cfg.tune.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.tune.seed)


def _log_search(logger: RunLogger, cfg: ExperimentConfig) -> None:
    """The parent run's description of the search: its space and scheduler as params and as `search.yaml`."""
    import yaml
    from mlflow.entities import Param

    tc = cfg.tune
    params = {f"space.{key}": " ".join(str(a) for a in spec) for key, spec in tc.space.items()}
    params |= {"search": tc.search, "scheduler": tc.scheduler, "metric": f"{tc.metric} ({tc.mode})"}
    if tc.scheduler == "asha":
        params |= {
            "asha.time_attr": "step",
            "asha.grace_period": str(tc.grace_period),
            "asha.reduction_factor": str(tc.reduction_factor),
            "asha.max_t": str(cfg.train.max_steps),
        }
    params = {f"sweep.{k}": v for k, v in params.items()}
    logger.client.log_batch(logger.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    search = {"space": tc.space, **{k: v for k, v in params.items() if not k.startswith("sweep.space.")}}
    logger.client.log_text(logger.run_id, yaml.safe_dump(search, sort_keys=False), "search.yaml")


def _trial_id(result) -> str:
    return Path(result.path).name.removeprefix(TRIAL_PREFIX)


def _ok(row: TrialRow) -> bool:
    return row.status != "ERROR" and math.isfinite(row.metric)


def _rows(grid, cfg: ExperimentConfig, uri: str, parent: str) -> list[TrialRow]:
    """One row per trial, best first; each trial's MLflow run is closed with its outcome."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    run_of = {r.data.tags.get(TRIAL_TAG): r.info.run_id for r in runs}
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        values = df[cfg.tune.metric].dropna() if df is not None and cfg.tune.metric in df else []
        steps = int(df["step"].max()) if df is not None and "step" in df and len(df) else 0
        error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:200]
        trial_id = _trial_id(result)
        row = TrialRow(
            trial_id=trial_id,
            status="ERROR" if result.error is not None else "TERMINATED",
            params={k: _plain(v) for k, v in result.config.items() if k in cfg.tune.space},
            metric=float(values.iloc[-1]) if len(values) else float("nan"),
            steps=steps,
            stopped_early=result.error is None and steps < cfg.train.max_steps,
            error=error,
            run_id=run_of.get(trial_id),
        )
        rows.append(row)
        if row.run_id is not None:
            client.set_tag(row.run_id, STOPPED_EARLY_TAG, str(row.stopped_early).lower())
            if row.status == "ERROR":
                client.set_tag(row.run_id, ERROR_TAG, error or "the trial failed")
            client.set_terminated(row.run_id, status="FAILED" if row.status == "ERROR" else "FINISHED")
    sign = 1.0 if cfg.tune.mode == "min" else -1.0
    return sorted(rows, key=lambda r: (not _ok(r), sign * r.metric if _ok(r) else 0.0, r.trial_id))


def ranked_table(rows: list[TrialRow], cfg: ExperimentConfig) -> str:
    """The trials as a fixed-width table, best first."""
    keys = list(cfg.tune.space)
    header = ["rank", "trial", *keys, cfg.tune.metric, "steps", "stopped early", "status"]
    lines = []
    for i, r in enumerate(rows, 1):
        values = [_fmt(r.params.get(k)) for k in keys]
        metric = f"{r.metric:.4f}" if math.isfinite(r.metric) else "-"
        early = "yes" if r.stopped_early else "no"
        status = r.status if not r.error else f"{r.status}: {r.error}"
        lines.append([str(i), r.trial_id, *values, metric, str(r.steps), early, status])
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header) - 1)]
    out = []
    for row in [header, *lines]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _log_results(logger: RunLogger, cfg: ExperimentConfig, rows: list[TrialRow], best_yaml: Path | None, path: Path):
    """The parent run's results: `results.csv`, `best.yaml`, the table, plots, and the best trial's metric."""
    import csv

    from pipelines.train.sweep_plots import metric_vs_params_png, parallel_coordinates_png

    keys = list(cfg.tune.space)
    csv_path = path / RESULTS_CSV
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", *keys, cfg.tune.metric, "steps", "stopped_early", "status", "error",
                         "mlflow_run_id"])  # fmt: skip
        for i, r in enumerate(rows, 1):
            writer.writerow([i, r.trial_id, *[r.params.get(k) for k in keys], r.metric, r.steps, r.stopped_early,
                             r.status, r.error, r.run_id or ""])  # fmt: skip
    logger.artifact(csv_path)
    logger.client.log_text(logger.run_id, ranked_table(rows, cfg) + "\n", "results.txt")
    if best_yaml is not None:
        logger.artifact(best_yaml)
        logger.client.set_tag(logger.run_id, "simba_ttm.best_trial", rows[0].trial_id)
        logger.metrics({f"best_{cfg.tune.metric}": rows[0].metric}, step=rows[0].steps)
    ok = [r for r in rows if _ok(r)]
    space = cfg.tune.space
    points = [(r.params, r.metric) for r in ok]
    logger.artifact(metric_vs_params_png(points, space, cfg.tune.metric, path / "plots" / "metric_vs_params.png"),
                    "plots")  # fmt: skip
    logger.artifact(parallel_coordinates_png(points, space, cfg.tune.metric, path / "plots" / "parallel.png"), "plots")
    logger.metrics({"trials": len(rows), "trials_failed": sum(r.status == "ERROR" for r in rows),
                    "trials_stopped_early": sum(r.stopped_early for r in rows)}, step=0)  # fmt: skip
