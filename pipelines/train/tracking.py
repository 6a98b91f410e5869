"""MLflow bookkeeping: one run per experiment name, created on the driver and reused on restart.

The driver finds or creates the run (so a restarted training continues the same run) and logs the
parameters; rank 0 of the training workers logs metrics and artifacts to that run id. Everything goes
through `MlflowClient` with an explicit run id: no process-global "active run" to leak between trials.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import mlflow
import ray
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from configs.schema import ExperimentConfig
from pipelines.paths import absolute_tracking_uri

NAME_TAG = "simba_ttm.name"
STORAGE_TAG = "simba_ttm.storage"
SUPERSEDED_TAG = "simba_ttm.superseded_by"  # on a run whose folder was deleted and trained anew


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    """The configured URI with a relative SQLite path made absolute, against $SIMBA_TTM_ROOT when set, else the
    working directory (Ray workers run elsewhere)."""
    return absolute_tracking_uri(cfg.mlflow.resolved_tracking_uri())


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def environment_params() -> dict[str, str]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    return {
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        "env.ray": ray.__version__,
        "env.mlflow": mlflow.__version__,
        "env.driver_device": device,
        "env.host": platform.node(),
    }


def experiment_id(cfg: ExperimentConfig, uri: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or "://" not in uri:
        # A local store keeps artifacts next to the database, as an absolute path: a relative one would
        # resolve inside whichever worker directory logs first.
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else Path(uri)
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_location)


def find_run(client, exp_id: str, name: str, storage: str):
    """The newest MLflow run tagged with this run name and run folder, or None."""
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{NAME_TAG}` = '{name}' and tags.`{STORAGE_TAG}` = '{storage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def start_or_resume_run(
    cfg: ExperimentConfig,
    storage: str,
    uri: str,
    config_yaml: Path | None = None,
    tags: dict[str, str] | None = None,
    *,
    resume: bool = True,
) -> str:
    """The run id for `cfg.name` stored under `storage`: the existing one (a restart), else a new run.

    resume: False when the run folder holds nothing to continue from (it was deleted, or the run died before its
    first checkpoint): then a new MLflow run starts, so that two trainings never share one metric history, and
    the old run is tagged `simba_ttm.superseded_by` with the new run's id.
    tags: set on a new run besides the name and storage (a sweep's trial: `mlflow.parentRunId`, so the UI nests it).
    """
    client = _client(uri)
    exp_id = experiment_id(cfg, uri)
    found = find_run(client, exp_id, cfg.name, storage)
    if found and resume:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "simba_ttm.resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        return run_id
    run = client.create_run(exp_id, run_name=cfg.name, tags={NAME_TAG: cfg.name, STORAGE_TAG: storage, **(tags or {})})
    run_id = run.info.run_id
    if found:
        client.set_tag(found.info.run_id, SUPERSEDED_TAG, run_id)
    params = {k: str(v)[:6000] for k, v in cfg.flatten().items()} | environment_params()
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    if config_yaml is not None:
        client.log_artifact(run_id, str(config_yaml))
    return run_id


class RunLogger:
    """Metrics and artifacts of one run, from one process (rank 0)."""

    def __init__(self, run_id: str, uri: str):
        self.run_id = run_id
        self.client = _client(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
