"""Which MLflow run a training logs to: the same one on a restart, a new one when there is nothing to continue."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from configs import load_config
from eval.evaluate import find_training_run
from pipelines.train.checkpoints import LOCAL_CHECKPOINT_PREFIX, MODEL_FILE, STATE_FILE, has_checkpoint
from pipelines.train.tracking import start_or_resume_run


def test_a_restart_continues_its_run_and_a_fresh_start_begins_a_new_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "debug"
    cfg = load_config("debug", [f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}"])
    first = start_or_resume_run(cfg, str(run_dir), uri)
    assert start_or_resume_run(cfg, str(run_dir), uri, resume=True) == first  # a restart: the same history

    fresh = start_or_resume_run(cfg, str(run_dir), uri, resume=False)  # the run folder was deleted, say
    client = MlflowClient(uri)
    assert fresh != first and client.get_run(first).data.tags["simba_ttm.superseded_by"] == fresh
    assert start_or_resume_run(cfg, str(run_dir), uri) == fresh  # later restarts continue the newest
    assert find_training_run(cfg, uri) == fresh  # and evaluation logs there


def test_has_checkpoint_reads_ray_trains_record_and_local_checkpoints(tmp_path):
    assert not has_checkpoint(tmp_path / "nowhere")
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": []}))
    assert not has_checkpoint(tmp_path)  # Ray Train started, no checkpoint registered yet
    snapshot.write_text('{"checkpoint_results": [{"metrics"')  # being written
    assert not has_checkpoint(tmp_path)
    snapshot.write_text(json.dumps({"checkpoint_results": [{"metrics": {"step": 10}}]}))
    assert has_checkpoint(tmp_path)

    local = tmp_path / "local"
    (local / f"{LOCAL_CHECKPOINT_PREFIX}000010").mkdir(parents=True)
    assert not has_checkpoint(local)  # incomplete: a crash mid-write
    for name in (MODEL_FILE, STATE_FILE):
        (local / f"{LOCAL_CHECKPOINT_PREFIX}000010" / name).write_bytes(b"x")
    assert has_checkpoint(local)
