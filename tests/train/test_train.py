"""Training on real Parquet from the preprocessing pipeline, with a real Ray runtime and MLflow store."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import ExperimentConfig, apply_overrides
from modeling.builders import build_model
from pipelines.train.checkpoints import load_model
from pipelines.train.dataset import TokenSplit, collate
from pipelines.train.driver import run_training
from pipelines.train.optim import lr_factor, make_optimizer
from tests.train.drivers import REPO, driver_command, driver_env, kill9_once, rerun


def _train_cfg(preprocessed, tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base, _ = preprocessed
    d = base.to_dict()
    d["train"].update(storage_path=str(tmp_path / "runs"), max_steps=30, warmup_steps=3, checkpoint_every=10)
    d["train"].update(val_every=10, generate_every=30, batch_size=2)
    d["data"]["max_frames"] = 128
    d["generation"].update(seconds=0.5, prompts=["a calm piano piece", "fast drums and bass"])
    d["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ExperimentConfig.from_dict(apply_overrides(d, overrides))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lambda s: lr_factor(s, warmup_steps=100, max_steps=1000, min_lr_ratio=0.005)  # noqa: E731
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(100) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(1000) == pytest.approx(0.005) and f(5000) == pytest.approx(0.005)
    assert all(f(s) >= f(s + 1) for s in range(100, 1000))


def test_one_batch_overfits_with_the_training_optimizer(preprocessed):
    cfg, _ = preprocessed
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.cond_dropout = 0.0
    split = TokenSplit.read(cfg.data.tokens_dir, "train", codebook=0, max_frames=64, pad_id=1024)
    batch = collate(split.batch(np.array([0, 1])))
    t = ExperimentConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "warmup_steps": 1}}).train
    opt, sched = make_optimizer(model, t)
    losses = []
    for _ in range(80):
        loss = model(batch["inputs"], batch["text"], batch["text_mask"], targets=batch["targets"]).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(1025), abs=0.3)
    assert losses[-1] < 0.35 * losses[0], losses[::10]


def _metric(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_debug_run_learns_and_logs_to_mlflow(preprocessed, ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _train_cfg(preprocessed, tmp_path, "train.lr=3e-3")
    out = run_training(cfg, local_mode=True)
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    loss = [v for _, v in _metric(client, out.run_id, "train_loss")]
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.5, loss
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_memory_bytes"):
        assert len(_metric(client, out.run_id, key)) == 30, key
    t = cfg.train  # the lr logged at step s is the one step s used: lr_factor(s - 1), warming up from step 1
    schedule = dict(warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)
    assert [v for _, v in _metric(client, out.run_id, "lr")] == pytest.approx(
        [t.lr * lr_factor(s - 1, **schedule) for s in range(1, 31)]
    )
    assert [s for s, _ in _metric(client, out.run_id, "val_loss")] == [10, 20, 30]
    assert run.data.params["model.arch"] == "simba" and run.data.params["train.lr"] == "0.003"
    assert "env.torch" in run.data.params
    files = _artifacts(client, out.run_id)
    assert "config.yaml" in files and "checkpoint/model.pt" in files
    wavs = [f for f in files if f.startswith("samples/step_000030/") and f.endswith(".wav")]
    pngs = [f for f in files if f.startswith("samples/step_000030/") and f.endswith(".png")]
    assert len(wavs) == len(pngs) == 2


def test_transformer_trains_under_the_same_config(preprocessed, ray_session, tmp_path):
    cfg = _train_cfg(preprocessed, tmp_path, "model.arch=transformer", "train.max_steps=6", "train.generate_every=0",
                     "train.val_every=3", "name=debug-transformer")  # fmt: skip
    out = run_training(cfg, local_mode=True)
    assert out.result.checkpoint is not None


def test_configuration_errors_fail_before_ray_starts(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cases = [
        (["data.tokens_dir=" + str(tmp_path / "nothing")], "no token parts"),
        (["model.arch=mamba"], "model.arch must be one of"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
    ]
    for overrides, message in cases:
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "ray_jobs.train", "--config", "configs/debug.yaml", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
        assert time.time() - t0 < 60


def _final_weights(out) -> dict[str, torch.Tensor]:
    return load_model(out.result.checkpoint.path)[0].state_dict()


def test_the_same_seed_repeats_the_run_exactly(preprocessed, ray_session, tmp_path):
    """Model init, data order, dropout and condition-dropout masks all follow train.seed: two runs of one config
    log the same losses and end on the same weights (CPU, fp32); another seed gives another run."""
    from mlflow.tracking import MlflowClient

    runs = []
    for k, seed in enumerate([0, 0, 1]):
        cfg = _train_cfg(preprocessed, tmp_path / str(k), "train.max_steps=8", "train.grad_accum=2",
                         "train.val_every=4", "train.generate_every=0", "train.checkpoint_every=8",
                         f"train.seed={seed}")  # fmt: skip
        out = run_training(cfg, local_mode=True)
        losses = [v for _, v in _metric(MlflowClient(out.tracking_uri), out.run_id, "train_loss")]
        runs.append((losses, _final_weights(out)))
    (loss_a, weights_a), (loss_b, weights_b), (loss_c, _) = runs
    assert len(loss_a) == 8 and loss_a == loss_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert loss_c != loss_a


RESUME = ("train.max_steps=60", "train.grad_accum=4", "train.generate_every=0", "train.val_every=0", "name=resume")


def test_kill9_then_restart_resumes_in_the_same_mlflow_run(preprocessed, ray_session, tmp_path):
    """A real TorchTrainer run killed with SIGKILL after its first checkpoint resumes from it when started
    again, keeps logging to the same MLflow run, and ends on the weights of an uninterrupted run."""
    from mlflow.tracking import MlflowClient

    cfg = _train_cfg(preprocessed, tmp_path, *RESUME)
    cmd = driver_command("ray_jobs.train", cfg.dump_yaml(tmp_path / "resume.yaml"), ray_session)
    run_dir = tmp_path / "runs" / "resume"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints

    def checkpointed() -> bool:
        return snapshot.is_file() and bool(json.loads(snapshot.read_text())["checkpoint_results"])

    kill9_once(cmd, driver_env(), tmp_path / "first.log", checkpointed, "no checkpoint", timeout=240)
    saved = max(r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"])
    assert 10 <= saved < 60

    rerun(cmd, driver_env())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("simba-ttm").experiment_id])
    assert len(runs) == 1, "a restart must continue the same MLflow run"
    steps = [s for s, _ in _metric(client, runs[0].info.run_id, "train_loss")]
    assert steps[-1] == 60 and set(range(1, 61)) <= set(steps)
    assert runs[0].info.status == "FINISHED"
    resumed = _metric(client, runs[0].info.run_id, "resumed_from_step")
    assert resumed and resumed[0][1] >= saved, resumed
    # steps up to the checkpoint were trained once: the restart did not begin again from step 0
    assert all(steps.count(s) == 1 for s in range(1, saved + 1))

    # The same rows, dropout masks and optimizer state as a run that was never interrupted. That one runs here,
    # in one thread like the Ray Train worker, so that float sums add up in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline = run_training(_train_cfg(preprocessed, tmp_path / "baseline", *RESUME), local_mode=True)
    finally:
        torch.set_num_threads(threads)
    resumed_weights = load_model(run_dir)[0].state_dict()
    for key, value in _final_weights(baseline).items():
        diff = float((resumed_weights[key] - value).norm() / value.norm().clamp_min(1e-12))
        assert diff < 1e-6, f"{key}: {diff:.2e} relative to the uninterrupted run"


def _with_one_nan_caption(tokens_dir: Path, out: Path, copies: int = 4) -> str:
    """A copy of the token rows in which one training clip's caption embedding is NaN (a corrupt row), and the
    other training clips repeat `copies` times (as other tracks), so that a worker's shard is more than that clip."""
    import pyarrow.parquet as pq

    from pipelines.preprocess.tokens import PART_GLOB, tokens_table, write_part

    rows = [r for part in sorted(tokens_dir.glob(PART_GLOB)) for r in pq.read_table(part).to_pylist()]
    bad = next(r for r in rows if r["split"] == "train")
    bad["text_emb"] = np.full_like(np.asarray(bad["text_emb"], dtype=np.float16), np.nan)
    clean = [r for r in rows if r["split"] == "train" and r is not bad]
    rows += [{**r, "track_id": f"{r['track_id']}_copy{k}"} for k in range(1, copies) for r in clean]
    write_part(tokens_table(rows), out)
    return bad["track_id"]


def _alarm(seconds: int):
    """Fail (TimeoutError) instead of hanging when a collective never completes."""

    def fire(*_):
        raise TimeoutError(f"training did not finish within {seconds} s: a worker is stuck in a collective")

    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


def test_two_workers_train_with_ddp(preprocessed, ray_session, tmp_path):
    """train.num_workers=2: two Ray Train workers (gloo DDP on CPU) with their own data shards."""
    from mlflow.tracking import MlflowClient

    cfg = _train_cfg(preprocessed, tmp_path, "train.num_workers=2", "train.batch_size=1", "train.max_steps=4",
                     "train.grad_accum=2", "train.val_every=2", "train.generate_every=0", "name=ddp")  # fmt: skip
    out = run_training(cfg)
    client = MlflowClient(out.tracking_uri)
    assert [m.step for m in client.get_metric_history(out.run_id, "train_loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(out.run_id, "val_loss")) == 2
    assert out.result.checkpoint is not None
    spread = client.get_metric_history(out.run_id, "replica_param_spread")  # checked at the final checkpoint
    assert [(m.step, m.value) for m in spread] == [(4, 0.0)]  # the two replicas are bit-identical
    overlap = client.get_metric_history(out.run_id, "shard_overlap_rows")  # rows both workers consumed this epoch
    assert [(m.step, m.value) for m in overlap] == [(4, 0.0)]


def test_a_nan_loss_on_one_ddp_worker_skips_the_step_on_both(preprocessed, ray_session, tmp_path):
    """One training clip has a NaN caption embedding, so one worker's loss is not finite while the other's is:
    both must still take part in DDP's gradient all-reduce (no hang), skip that step, and stay identical."""
    from mlflow.tracking import MlflowClient

    base, _ = preprocessed
    tokens = tmp_path / "tokens"
    _with_one_nan_caption(Path(base.data.tokens_dir), tokens)
    # grad_accum 1: every micro-batch syncs, so a worker that skipped backward would hang the other at once
    # 12 steps: more than an epoch of either worker's shard, so the NaN clip is met
    cfg = _train_cfg(preprocessed, tmp_path, "train.num_workers=2", "train.batch_size=1", "train.max_steps=12",
                     "train.grad_accum=1", "train.val_every=0", "train.generate_every=0", "name=ddp-nan",
                     "train.checkpoint_every=6", f"data.tokens_dir={tokens}")  # fmt: skip
    _alarm(300)
    try:
        out = run_training(cfg)
    finally:
        signal.alarm(0)
    client = MlflowClient(out.tracking_uri)
    losses = client.get_metric_history(out.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 13)) and all(math.isfinite(m.value) for m in losses)
    skipped = [m.value for m in client.get_metric_history(out.run_id, "nonfinite_skipped")]
    assert skipped[-1] >= 1, "the NaN clip was never met: the test lost its point"
    spread = client.get_metric_history(out.run_id, "replica_param_spread")
    assert [(m.step, m.value) for m in spread] == [(6, 0.0), (12, 0.0)]


def test_training_samples_truncate_prompts_as_preprocessing_did(preprocessed):
    """The prompts of training's samples are encoded with preprocessing's caption length limit."""
    from pipelines.train.samples import SampleWriter

    cfg = ExperimentConfig.from_dict(apply_overrides(preprocessed[0].to_dict(), ["preprocess.text_max_length=6"]))
    writer = SampleWriter(cfg, torch.device("cpu"))
    _, lengths = writer.text_encoder(["a calm piano piece with soft strings and a slow, relaxing mood " * 4])
    assert lengths.tolist() == [6]
