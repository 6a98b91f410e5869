"""Hyperparameter search on a real Ray Tune, with a real MLflow store and the Parquet of a real preprocessing run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs import ExperimentConfig, apply_overrides, load_config
from pipelines.train.checkpoints import find_checkpoint, run_folder
from pipelines.train.driver import run_training
from pipelines.train.sweep import BEST_YAML, PARENT_TAG, STOPPED_EARLY_TAG, TRIAL_TAG, ranked_table, run_sweep
from tests.train.drivers import REPO, driver_command, driver_env, kill9_once, rerun

# Two good and two useless learning rates (grid: in this order), so that ASHA has something to stop at step 4
# whatever order the two concurrent trials reach it in; dropout is drawn.
SPACE = "tune.space={train.lr: [grid, 3.0e-3, 1.0e-6, 2.0e-3, 2.0e-6], model.dropout: [uniform, 0.1, 0.4]}"


def _sweep_cfg(preprocessed, tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base, _ = preprocessed
    d = base.to_dict()
    d["name"] = "sweep"
    d["train"].update(storage_path=str(tmp_path / "runs"), max_steps=12, warmup_steps=2, checkpoint_every=4)
    # val_every does not divide the checkpoint steps (4, 8, 12): the reports at 4 and 8 still carry val_loss
    d["train"].update(val_every=3, generate_every=0, batch_size=2)
    d["data"]["max_frames"] = 64
    d["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    d["tune"].update(num_samples=1, max_concurrent_trials=2, grace_period=4, reduction_factor=2.0)
    d["tune"]["resources_per_trial"] = {"cpu": 1.0, "gpu": 0.0}
    return ExperimentConfig.from_dict(apply_overrides(d, [SPACE, *overrides]))


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_asha_sweep_nests_trials_in_mlflow_and_writes_a_trainable_best_yaml(preprocessed, ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _sweep_cfg(preprocessed, tmp_path)
    out = run_sweep(cfg)
    table = ranked_table(out.rows, cfg)
    print(table)

    assert len(out.rows) == 4 and all(r.status == "TERMINATED" for r in out.rows), table
    early = [r for r in out.rows if r.stopped_early]
    assert early and all(r.steps < 12 for r in early), table  # ASHA stopped some trial at a rung
    assert any(r.steps == 12 and not r.stopped_early for r in out.rows), table
    assert out.rows[0].params["train.lr"] in (3e-3, 2e-3), table  # a useful learning rate wins
    metrics = [r.metric for r in out.rows]
    assert metrics == sorted(metrics)

    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.space.train.lr"].startswith("grid")
    assert parent.data.params["sweep.asha.grace_period"] == "4"
    files = {f.path for f in client.list_artifacts(out.parent_run_id)}
    assert {"results.csv", "best.yaml", "search.yaml", "results.txt", "config.yaml", "plots"} <= files
    plots = {f.path for f in client.list_artifacts(out.parent_run_id, "plots")}
    assert plots == {"plots/metric_vs_params.png", "plots/parallel.png"}

    for row in out.rows:  # every trial is a run nested under the sweep, with its config and every step
        run = client.get_run(row.run_id)
        assert run.data.tags[PARENT_TAG] == out.parent_run_id and run.data.tags[TRIAL_TAG] == row.trial_id
        assert run.data.tags[STOPPED_EARLY_TAG] == str(row.stopped_early).lower()
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == row.params["train.lr"]
        assert float(run.data.params["model.dropout"]) == pytest.approx(row.params["model.dropout"])
        assert run.data.params["model.d_model"] == str(cfg.model.d_model)
        assert [s for s, _ in _history(client, row.run_id, "train_loss")] == list(range(1, row.steps + 1))
        # the trial's folder is a run folder of its own (config.yaml): `evaluate --checkpoint` on one trial writes
        # <trial>/eval/step_N, not the sweep's eval/ that every trial's step N shared
        trial_dir = out.path / f"trial_{row.trial_id}"
        saved = load_config(trial_dir / "config.yaml")
        assert saved.name == run.info.run_name and saved.train.lr == row.params["train.lr"]
        assert run_folder(find_checkpoint(trial_dir), saved) == trial_dir

    # best.yaml is a full config with the winner's values; trained, it repeats the winning trial's losses: the
    # trials run the same loop as `simba-ttm train` (same seed, fp32 CPU, one thread like the trial's process).
    best = load_config(out.path / BEST_YAML)
    assert best.train.lr == out.rows[0].params["train.lr"]
    assert best.model.dropout == out.rows[0].params["model.dropout"]
    assert best.model.d_model == cfg.model.d_model and best.name == "sweep-best"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = run_training(best, local_mode=True)
    finally:
        torch.set_num_threads(threads)
    alone = _history(client, trained.run_id, "train_loss")
    in_sweep = _history(client, out.rows[0].run_id, "train_loss")
    assert len(alone) == 12
    for (step, a), (_, b) in zip(alone, in_sweep, strict=True):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: train {a} vs trial {b}"


def test_a_crashing_trial_is_reported_and_the_sweep_goes_on(preprocessed, ray_session, tmp_path):
    """lr 1e3 makes every step non-finite after the first; with max_nonfinite_steps=1 that trial fails."""
    from mlflow.tracking import MlflowClient

    cfg = _sweep_cfg(
        preprocessed, tmp_path, "tune.space={train.lr: [grid, 3.0e-3, 1.0e+30]}", "tune.scheduler=none",
        "train.max_steps=4", "train.max_nonfinite_steps=1", "train.grad_clip=0", "train.val_every=4",
    )  # fmt: skip
    out = run_sweep(cfg)
    table = ranked_table(out.rows, cfg)
    print(table)
    ok, failed = out.rows
    assert ok.status == "TERMINATED" and ok.params["train.lr"] == 3e-3
    assert failed.status == "ERROR" and "non-finite" in failed.error, table
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["simba_ttm.error"]
    assert "error.txt" in {f.path for f in client.list_artifacts(failed.run_id)}
    assert load_config(out.path / BEST_YAML).train.lr == 3e-3

    # --resume continues a sweep with the settings it ran with: the same config passes, another is refused.
    from configs import ConfigError
    from pipelines.paths import absolute_paths
    from pipelines.train.sweep import check_sweep

    check_sweep(absolute_paths(cfg), resume=True)
    longer = ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), ["train.max_steps=5"]))
    with pytest.raises(ConfigError, match="ran with other settings.*\n  train.max_steps: 4 -> 5"):
        check_sweep(absolute_paths(longer), resume=True)

    # The sweep's folder deleted, a sweep of that name searches anew: a new parent run (with its own space), the
    # old one marked superseded; its trials stay under the old parent.
    import shutil

    shutil.rmtree(out.path)
    only = ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), ["tune.space={train.lr: [grid, 2.0e-3]}"]))
    again = run_sweep(only)
    assert again.parent_run_id != out.parent_run_id and [r.params["train.lr"] for r in again.rows] == [2e-3]
    assert client.get_run(out.parent_run_id).data.tags["simba_ttm.superseded_by"] == again.parent_run_id
    assert client.get_run(again.parent_run_id).data.params["sweep.space.train.lr"].startswith("grid")


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.space={model.d_stat: [choice, 8, 16]}", "did you mean 'model.d_state'?"),
        ("tune.space={train.lr: [logunifrom, 3e-5, 3e-4]}", "tune.space['train.lr'] must be a distribution"),
        ("tune.space={train.lr: [loguniform, 3e-4, 3e-5]}", "loguniform needs lo < hi"),
        ("tune.space={model.d_model: [choice, 64, 40], model.headdim: [choice, 16, 32]}",
         "tune.space can give model.d_model = 40, model.headdim = 32 together"),  # each fits alone
    ],
)
def test_a_bad_search_space_fails_before_ray_starts(override, message):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.tune", "--config", "configs/tune_debug.yaml", override],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert time.time() - t0 < 60


def _trial_states(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status, from the newest experiment state Tune saved (what `Tuner.restore` reads)."""
    import json

    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        trials = [json.loads(t[0]) for t in json.loads(files[-1].read_text())["trial_data"]]  # [trial, runtime]
    except (ValueError, KeyError):  # being written
        return {}
    return {t["trial_id"]: t["status"] for t in trials}


def test_kill9_of_the_sweep_driver_then_resume(preprocessed, ray_session, tmp_path):
    """The driver killed with SIGKILL after its first trial finished: `--resume` keeps that trial (not rerun),
    runs the others, and the sweep ends in the same MLflow parent run."""
    from mlflow.tracking import MlflowClient

    cfg = _sweep_cfg(preprocessed, tmp_path, "tune.space={train.lr: [grid, 3.0e-3, 2.0e-3, 1.0e-3]}",
                     "tune.scheduler=none", "tune.max_concurrent_trials=1", "name=resumed")  # fmt: skip
    cmd = driver_command("ray_jobs.tune", cfg.dump_yaml(tmp_path / "sweep.yaml"), ray_session)
    # One trial at a time (tune.max_concurrent_trials=1); Tune saves its experiment state at most every 10 s by
    # default ("auto") and these trials take seconds: save every 0.5 s, so the first trial's end is seen early.
    env = driver_env(TUNE_GLOBAL_CHECKPOINT_S="0.5")
    sweep_dir = tmp_path / "runs" / "resumed"

    def a_trial_finished() -> bool:
        return "TERMINATED" in _trial_states(sweep_dir).values()

    kill9_once(cmd, env, tmp_path / "first.log", a_trial_finished, "no trial finished", timeout=300)
    done_before = {t for t, s in _trial_states(sweep_dir).items() if s == "TERMINATED"}
    assert 1 <= len(done_before) < 3, _trial_states(sweep_dir)

    second = rerun([*cmd, "--resume"], env)
    assert "best config:" in second.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("simba_ttm.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "the resume must continue the parent run"
    trials = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id}
    assert len(trials) == 3 and set(_trial_states(sweep_dir).values()) == {"TERMINATED"}
    for trial_id, run in trials.items():
        steps = [s for s, _ in _history(client, run.info.run_id, "train_loss")]
        assert sorted(set(steps)) == list(range(1, 13)), (trial_id, steps)
        if trial_id in done_before:  # finished before the kill: not run again
            assert steps == list(range(1, 13)), (trial_id, steps)
            assert not client.get_metric_history(run.info.run_id, "resumed_from_step")


def test_random_search_runs_at_most_max_concurrent_trials():
    """Ray ignores TuneConfig.max_concurrent_trials for a generator instance: the generator must limit itself (all
    three trials of the kill -9 test once ran at the same time on CI, although max_concurrent_trials was 1)."""
    from pipelines.train.sweep import _searcher

    for n in (1, 2, 0):
        assert _searcher(load_config("tune_debug", [f"tune.max_concurrent_trials={n}"])).max_concurrent == n


def test_tune_seed_repeats_the_random_draws():
    from ray.tune.experiment import Experiment

    from pipelines.train.sweep import _searcher, search_space

    def draws(seed: int) -> list[dict]:
        cfg = load_config("tune_debug", [f"tune.seed={seed}", "tune.max_concurrent_trials=0"])  # 3 live at once
        searcher = _searcher(cfg)
        searcher.add_configurations(
            [Experiment("x", lambda c: None, config=search_space(cfg.tune.space), num_samples=3)]
        )
        return [searcher.next_trial().config for _ in range(3)]

    assert draws(0) == draws(0) and draws(0) != draws(1)


def test_a_trial_trains_on_one_worker_with_the_sweeps_effective_batch():
    """Tune gives a trial one process: train.num_workers folds into grad_accum (best.yaml keeps both as given)."""
    from pipelines.train.sweep import on_one_worker, trial_config

    base = load_config("tune_debug", ["train.num_workers=4", "train.grad_accum=2", "train.batch_size=3"])
    best = trial_config(base.to_dict(), {"train.lr": 1e-3}, "t")  # what best.yaml holds: as given
    assert (best.train.num_workers, best.train.grad_accum, best.train.lr) == (4, 2, 1e-3)
    trial = on_one_worker(best)  # what the trial trains with
    assert (trial.train.num_workers, trial.train.grad_accum, trial.train.lr) == (1, 8, 1e-3)
    assert trial.train.effective_batch_size == base.train.effective_batch_size == 24
