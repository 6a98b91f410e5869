"""Which checkpoints of a run `simba-ttm evaluate --run` evaluates, from what each step's metrics.json records.

A step's `metrics.json` keeps `settings`, what its numbers depend on besides the checkpoint
(`eval.evaluate.evaluation_settings`: the eval set, how many clips, their length, the scoring models, the sampling
distribution). `plan_run` sorts the steps: without one, to do; with the same settings, done (a rerun picks up where
it stopped); the same settings but no MLflow run then and one found now, to log; other settings, refused before
anything runs (`StaleEvaluationError`, saying what differs) unless `force` evaluates them again (the old metrics.json
is kept beside the new one). `evaluate_run` carries the plan out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from configs import changes
from eval.evaluate import (
    METRICS_FILE,
    CheckpointEvaluator,
    Evaluation,
    format_metrics,
    log_recorded,
    run_checkpoints,
    step_dir,
)


class StaleEvaluationError(ValueError):
    """Steps whose metrics.json was written with other settings than the ones asked for (see `plan_run`)."""


@dataclass
class RunPlan:
    """What `evaluate_run` does with each checkpoint of a run, by step."""

    checkpoints: dict[int, Path] = field(default_factory=dict)  # every checkpoint of the run (`run_checkpoints`)
    todo: dict[int, Path] = field(default_factory=dict)  # no metrics.json (or re-evaluated with `force`)
    done: list[int] = field(default_factory=list)  # evaluated with these settings
    unrecorded: list[int] = field(default_factory=list)  # evaluated by an earlier version (no settings): done
    unlogged: list[int] = field(default_factory=list)  # evaluated with these settings, not yet in MLflow
    changed: dict[int, list[str]] = field(default_factory=dict)  # evaluated with other settings: how they differ


def plan_run(
    evaluator: CheckpointEvaluator, run_dir: Path, force: bool = False, checkpoints: dict[int, Path] | None = None
) -> RunPlan:
    """Sort the checkpoints of `run_dir` (see `RunPlan`); with `force`, the changed ones are also to do.
    `checkpoints`: `run_checkpoints(run_dir)` when the caller has it already."""
    from pipelines.train.checkpoints import saved_config

    checkpoints = run_checkpoints(run_dir) if checkpoints is None else checkpoints
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint (model.pt) in {str(run_dir)!r} or below")
    plan = RunPlan(checkpoints=checkpoints)
    for step, file in checkpoints.items():
        metrics_file = step_dir(run_dir, step) / METRICS_FILE
        if not metrics_file.is_file():
            plan.todo[step] = file
            continue
        summary = json.loads(metrics_file.read_text())
        if "settings" not in summary:  # an earlier version's: kept as done (nothing to compare), force redoes it
            if force:
                plan.todo[step] = file
            else:
                plan.unrecorded.append(step)
            continue
        cfg = saved_config(file)
        changed = changes(summary["settings"], evaluator.settings(cfg))
        if changed:
            plan.changed[step] = changed
            if force:
                plan.todo[step] = file
        elif summary.get("mlflow_run_id") is None and evaluator.training_run(cfg)[0] is not None:
            plan.unlogged.append(step)
        else:
            plan.done.append(step)
    if plan.changed and not force:
        listing = "\n".join(f"  step {step}: {'; '.join(changed)}" for step, changed in plan.changed.items())
        raise StaleEvaluationError(
            f"{len(plan.changed)} step(s) of {run_dir} were evaluated with other settings than these:\n{listing}\n"
            "evaluate with their settings, or pass --force to evaluate them again with these (the old metrics.json "
            "is kept as metrics.replaced-<time>.json; MLflow gets the new values at the same steps, which figure3 "
            "draws)"
        )
    plan.todo = dict(sorted(plan.todo.items()))
    return plan


def evaluate_run(
    evaluator: CheckpointEvaluator, run_dir: Path, log=print, force: bool = False, plan: RunPlan | None = None
) -> tuple[list[Evaluation], RunPlan]:
    """Evaluate every checkpoint of `run_dir` not yet evaluated with the evaluator's settings, in step order, and
    log to MLflow the steps evaluated while their training run could not be found (`plan_run`).

    Returns:
        (the new evaluations, the plan they followed: `plan` when given, else `plan_run`'s).
    Raises:
        StaleEvaluationError, before anything runs, when steps were evaluated with other settings (unless `force`).
    """
    plan = plan or plan_run(evaluator, run_dir, force)
    from pipelines.train.checkpoints import saved_config
    from pipelines.train.tracking import RunLogger

    for step in plan.unlogged:
        run_id, uri = evaluator.training_run(saved_config(plan.checkpoints[step]))
        log_recorded(step_dir(run_dir, step), RunLogger(run_id, uri))
        log(f"step {step}: logged its earlier evaluation to MLflow run {run_id}")
    todo = [(file, step_dir(run_dir, step)) for step, file in plan.todo.items()]
    done = evaluator.evaluate(todo, log) if todo else []
    for ev in done:
        log(format_metrics(ev))
    return done, plan
