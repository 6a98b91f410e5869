"""`ray job submit` from a "laptop" to a local Ray head: the debug training as a Ray job, checked in MLflow."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def ray_head(tmp_path):
    """A real head from `ray start --head --block` on 127.0.0.1 with 2 CPUs, in its own process group so that
    stopping it cannot touch any other Ray instance on the machine (`ray stop` would stop them all)."""
    import ray

    ray.shutdown()  # the test session's in-process Ray: one instance on the machine at a time
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    port, dashboard = _free_port(), _free_port()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
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


def test_submitted_debug_training_succeeds_and_logs_to_mlflow(preprocessed, ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    base, _ = preprocessed
    cfg = base.to_dict()
    cfg["name"] = "submitted"
    cfg["train"].update(storage_path=str(tmp_path / "runs"), max_steps=8, checkpoint_every=4, val_every=4,
                        generate_every=0, batch_size=2)  # fmt: skip
    cfg["data"]["max_frames"] = 128
    cfg_path = tmp_path / "submitted.yaml"
    from configs import ExperimentConfig

    ExperimentConfig.from_dict(cfg).dump_yaml(cfg_path)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"MLFLOW_TRACKING_URI": db, "RAY_AUTH_MODE": "disabled"}}
    job_id = f"simba-test-{int(time.time())}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "simba-ttm", "train", "--config", str(cfg_path)]  # fmt: skip
    for _ in range(30):  # the job server answers before the node's job agent is up: "try again later"
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(address)
    deadline = time.time() + 600
    while (status := jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish in 600 s"
        time.sleep(2)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "finished: MLflow run" in logs

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("simba-ttm").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4, 8]
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "checkpoint")
    }
    assert {"config.yaml", "checkpoint/model.pt"} <= artifacts
