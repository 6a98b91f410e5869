"""`ray job submit` from a "laptop" to a local Ray head: the debug training as a Ray job, checked in MLflow.

Like the README's command, the jobs run in Ray's copy of the working directory, with relative output paths: without
$SIMBA_TTM_ROOT they are refused before anything starts; with it, checkpoints and the MLflow store land under it.
One head serves the module (starting it costs tens of seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.sys.executable).parent
EXCLUDES = [".venv", ".git", "data", "runs", "outputs", "mlflow.db", "mlartifacts", "**/__pycache__", ".pytest_cache",
            ".ruff_cache", ".whl", ".gl"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head from `ray start --head --block` on 127.0.0.1 with 2 CPUs, in its own process group so that
    stopping it cannot touch any other Ray instance on the machine (`ray stop` would stop them all)."""
    import ray

    ray.shutdown()  # the test session's in-process Ray: one instance on the machine at a time
    tmp_path = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SIMBA_TTM_ROOT")}  # the defaults
    env |= {"RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    log = open(tmp_path / "head.log", "w")
    # The job agent's port too: its default (52365) is taken while any other Ray runs on the machine (a local
    # ray.init starts an agent), and then every submission fails with "No available agent".
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head's job server did not come up in 180 s"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # `ray start` records its address for later plain `ray.init()` calls; do not leave a dead one behind.
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def _debug_config(preprocessed, path: Path, storage_path: str, tokens_dir: str | None = None) -> Path:
    """The preprocessed debug data (or `tokens_dir`) and a short training (8 steps, checkpoints at 4 and 8) as a
    YAML file."""
    from configs import ExperimentConfig

    base, _ = preprocessed
    cfg = base.to_dict()
    cfg["name"] = "submitted"
    cfg["train"].update(storage_path=storage_path, max_steps=8, checkpoint_every=4, val_every=4, generate_every=0,
                        batch_size=2)  # fmt: skip
    cfg["data"].update(max_frames=128, tokens_dir=tokens_dir or base.data.tokens_dir)
    ExperimentConfig.from_dict(cfg).dump_yaml(path)
    return path


def _submit(ray_head, cfg_path: Path, env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """Submit `simba-ttm train --config cfg_path` with the repository as its working directory, as the README does,
    first printing that directory (cwd=...); wait for the job to end. Returns (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"RAY_AUTH_MODE": "disabled", **(env_vars or {})}}
    job_id = f"simba-test-{time.time_ns()}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "sh", "-c", f'echo "cwd=$PWD" && exec simba-ttm train --config {cfg_path}']  # fmt: skip
    for _ in range(30):  # the job server answers before the node's job agent is up: "try again later"
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    jobs = JobSubmissionClient(address)
    deadline = time.time() + 600
    while (status := jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish in 600 s"
        time.sleep(1)
    return status, jobs.get_job_logs(job_id)


def _package(logs: str) -> Path:
    """The job's working directory, which its entrypoint printed first: Ray's copy of the repository."""
    cwd = Path(re.search(r"^cwd=(.+)$", logs, re.MULTILINE).group(1))
    assert cwd.parts[-3:-1] == ("runtime_resources", "working_dir_files"), cwd  # so the test means something
    return cwd


def test_submitted_relative_paths_are_refused_without_a_root(preprocessed, ray_head, tmp_path):
    """The README's short command with a relative train.storage_path and the default MLflow store: on the old code
    the job trained into Ray's copy and succeeded; now it fails before anything starts, naming what to change."""
    from ray.job_submission import JobStatus

    cfg_path = _debug_config(preprocessed, tmp_path / "relative.yaml", storage_path="runs/submitted")
    start = time.time()
    status, logs = _submit(ray_head, cfg_path)
    print(f"refused in {time.time() - start:.1f} s")
    assert status == JobStatus.FAILED, logs[-4000:]
    assert "simba-ttm train: relative paths in a Ray job would resolve inside Ray's temporary copy" in logs, logs
    assert "train.storage_path=runs/submitted, the MLflow store sqlite:///mlflow.db (from the default)." in logs
    assert "data.tokens_dir" not in logs  # absolute
    assert """'{"env_vars": {"SIMBA_TTM_ROOT": "/srv/simba"}}'""" in logs
    assert "MLflow run" not in logs  # nothing started
    package = _package(logs)
    assert not (package / "runs").exists() and not (package / "mlflow.db").exists()


def test_submitted_training_with_a_root_keeps_its_outputs_and_logs_to_mlflow(preprocessed, ray_head, tmp_path):
    """The same relative paths (the tokens too) with $SIMBA_TTM_ROOT set in the runtime env: checkpoints, the
    default MLflow store and its artifacts land under the root, none in Ray's copy of the repository."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    base, _ = preprocessed
    root = tmp_path / "root"
    shutil.copytree(base.data.tokens_dir, root / "data" / "tokens")
    cfg_path = _debug_config(preprocessed, tmp_path / "rooted.yaml", storage_path="runs", tokens_dir="data/tokens")
    status, logs = _submit(ray_head, cfg_path, env_vars={"SIMBA_TTM_ROOT": str(root)})
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "finished: MLflow run" in logs
    assert f"latest checkpoint: {root / 'runs' / 'submitted'}/checkpoint_" in logs
    assert len(list((root / "runs" / "submitted").glob("checkpoint_*"))) >= 1
    package = _package(logs)
    assert not {"runs", "mlflow.db", "mlartifacts"} & {p.name for p in package.iterdir()}

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simba-ttm")
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4, 8]
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "checkpoint")
    }
    assert {"config.yaml", "checkpoint/model.pt"} <= artifacts
