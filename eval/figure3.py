"""The paper's Fig. 3: FAD, KLD and CLAP score over training steps, one line per run, from MLflow.

Training logs `train_loss` (every optimizer step) and `val_loss`; `simba-ttm evaluate` logs `eval/fad`, `eval/kld`
and `eval/clap` into the same run at the checkpoint's optimizer step. This module reads those histories back
(`MlflowClient.get_metric_history`), draws them (`eval.plots.metrics_over_steps_png`), writes the plotted points as
a CSV and records both in a new "comparison" run of the source runs' experiment.

Runs are named by id or by run name (a training run is named after its config's `name`). A name is looked up
among the training runs (tagged `simba_ttm.name`; other runs only when no training run has it), leaving out runs
superseded by a new training of the same folder. A name that still matches several runs (the same config trained
into two storage folders or experiments) is refused, listing their ids to choose from.

A metric logged twice at one step (a training run resumed from an earlier checkpoint logs the steps after it again,
an evaluation re-run logs its step again) keeps its last-logged value: the one of the history that went on.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Param, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

EVAL_METRICS = ("eval/fad", "eval/kld", "eval/clap")
LOSS_METRICS = ("train_loss", "val_loss")
METRICS = EVAL_METRICS + LOSS_METRICS
CSV_COLUMNS = ("run_id", "run_name", "arch", "metric", "step", "value")
KIND_TAG = "simba_ttm.kind"
SOURCES_TAG = "simba_ttm.source_runs"
RUN_ID = re.compile(r"[0-9a-f]{32}")
LISTED = 30  # runs named in an unknown-run error


class RunNotFoundError(LookupError):
    """A --runs entry that is neither a run id nor a run name in the store, or a name of several runs."""


@dataclass
class RunSeries:
    """One run's metric histories: metric -> (steps, values), ascending steps, one value per step."""

    run_id: str
    run_name: str
    arch: str
    experiment_id: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.arch}: {self.run_name}"


def _describe(run: Run) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    arch = run.data.params.get("model.arch", "?")
    return f"{run.info.run_name} ({run.info.run_id}, {arch}, started {started})"


def _quoted(value: str) -> str:
    """A value for an MLflow filter string (single quotes unless the value holds one)."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time DESC"], page_token=token,
        )  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def find_runs(client: MlflowClient, refs: Sequence[str]) -> tuple[list[Run], list[str]]:
    """Resolve run ids or run names to runs, in the order given (a run named twice is kept once).

    Returns:
        (runs, notes): notes say which entries named one run twice.
    Raises:
        RunNotFoundError naming the missing entries and listing the runs the store holds, or naming a run name
        that several training runs share, with their ids.
    """
    from pipelines.train.tracking import NAME_TAG, SUPERSEDED_TAG

    experiments = _experiment_ids(client)
    runs: dict[str, Run] = {}
    notes, missing = [], []
    for ref in refs:
        run = None
        if RUN_ID.fullmatch(ref):
            try:
                run = client.get_run(ref)
            except MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage == "deleted":
                run = None
        if run is None:
            matches = _all_runs(client, experiments, f"attributes.run_name = {_quoted(ref)}") if experiments else []
            training = [m for m in matches if NAME_TAG in m.data.tags and SUPERSEDED_TAG not in m.data.tags]
            matches = training or matches
            if len(matches) > 1:
                listing = "\n".join(f"  {_describe(m)}" for m in matches)
                raise RunNotFoundError(f"run name {ref!r} names {len(matches)} runs; pass one's id:\n{listing}")
            run = matches[0] if matches else None
        if run is None:
            missing.append(ref)
        elif run.info.run_id in runs:
            notes.append(f"{ref!r} names run {run.info.run_id} again; drawn once")
        else:
            runs[run.info.run_id] = run
    if missing:
        existing = _all_runs(client, experiments) if experiments else []
        listing = "\n".join(f"  {_describe(r)}" for r in existing[:LISTED])
        more = f"\n  ... and {len(existing) - LISTED} more" if len(existing) > LISTED else ""
        raise RunNotFoundError(
            f"no run with id or name {', '.join(map(repr, missing))} in {client.tracking_uri}; "
            + (f"it holds (newest first):\n{listing}{more}" if existing else "it holds no runs")
        )
    return list(runs.values()), notes


def metric_series(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """A metric's history as (steps, values): ascending steps, the last-logged value at a step logged twice."""
    last: dict[int, tuple[int, float]] = {}
    for i, m in enumerate(client.get_metric_history(run_id, key)):
        stamp = (m.timestamp, i)  # the history's own order breaks ties between equal timestamps
        if m.step not in last or stamp >= last[m.step][0]:
            last[m.step] = (stamp, m.value)
    steps = sorted(last)
    return steps, [last[s][1] for s in steps]


def load_series(client: MlflowClient, runs: Sequence[Run], metrics: Sequence[str] = METRICS) -> list[RunSeries]:
    """Every run's histories of `metrics` (empty ones included, as empty lists)."""
    return [
        RunSeries(
            run_id=run.info.run_id,
            run_name=run.info.run_name,
            arch=run.data.params.get("model.arch", "?"),
            experiment_id=run.info.experiment_id,
            series={key: metric_series(client, run.info.run_id, key) for key in metrics},
        )
        for run in runs
    ]


def csv_rows(series: Sequence[RunSeries]) -> list[dict]:
    """The plotted points, one per row: run_id, run_name, arch, metric, step, value."""
    return [
        dict(run_id=s.run_id, run_name=s.run_name, arch=s.arch, metric=key, step=step, value=value)
        for s in series
        for key, (steps, values) in s.series.items()
        for step, value in zip(steps, values, strict=True)
    ]


def write_csv(series: Sequence[RunSeries], path: str | Path) -> Path:
    """`csv_rows` as a CSV file (values as Python's repr writes them: they read back to the same floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(series))
    return path


def log_comparison(client: MlflowClient, series: Sequence[RunSeries], files: Sequence[str | Path]) -> str:
    """A new run in the first source run's experiment, tagged `simba_ttm.kind=figure3`, recording the source runs
    (params `runs`, `run_names`, `archs`; tag `simba_ttm.source_runs`) with `files` as artifacts. Returns its id."""
    ids = ",".join(s.run_id for s in series)
    run = client.create_run(
        series[0].experiment_id,
        run_name=("figure3: " + " vs ".join(s.run_name for s in series))[:250],  # MLflow's run name limit
        tags={KIND_TAG: "figure3", SOURCES_TAG: ids[:8000]},  # MLflow's tag value limit
    )
    run_id = run.info.run_id
    params = {
        "runs": ids,
        "run_names": ",".join(s.run_name for s in series),
        "archs": ",".join(s.arch for s in series),
        "metrics": ",".join(METRICS),
    }
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id)
    return run_id
