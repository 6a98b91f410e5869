"""EMA weights, the best-by-validation checkpoint, the progress line and MFU; local-mode checkpoints and resume."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from torch import nn

from configs import ConfigError, ExperimentConfig, apply_overrides
from pipelines.train.checkpoints import BEST_DIR, find_checkpoint, load_model
from pipelines.train.driver import run_training
from pipelines.train.ema import EMA
from pipelines.train.progress import Progress


def test_ema_follows_the_textbook_recursion_and_applied_restores_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = {k: 0.9 * expected[k] + 0.1 * v for k, v in model.state_dict().items()}
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model) as m:
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def _cfg(preprocessed, tmp_path, *overrides: str) -> ExperimentConfig:
    base, _ = preprocessed
    d = base.to_dict()
    d["train"].update(storage_path=str(tmp_path / "runs"), max_steps=8, warmup_steps=2, checkpoint_every=4,
                      val_every=2, generate_every=0, batch_size=2, keep_checkpoints=5, log_every=4)  # fmt: skip
    d["data"]["max_frames"] = 64
    d["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ExperimentConfig.from_dict(apply_overrides(d, ["name=features", *overrides]))


def test_ema_best_checkpoint_progress_and_a_local_mode_resume(preprocessed, ray_session, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(preprocessed, tmp_path, "train.ema_decay=0.8", "train.lr=3e-3")
    out = run_training(cfg, local_mode=True)
    run_dir = tmp_path / "runs" / "features"

    # progress: one line every log_every steps, with the numbers MLflow has
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("[features] step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["[features] step 4/8", "[features] step 8/8"], lines
    assert all(re.search(r"loss \d+\.\d{4} \| val \d+\.\d{4} \| lr .* tok/s \| MFU \d+\.\d% \| ETA \d+m\d\ds", ln)
               for ln in lines), lines  # fmt: skip
    client = MlflowClient(out.tracking_uri)
    mfu = [m.value for m in client.get_metric_history(out.run_id, "mfu")]
    assert len(mfu) == 8 and all(0 < v < 1 for v in mfu), mfu

    # best/: the lowest validation loss of the run, picked by name
    val = {m.step: m.value for m in client.get_metric_history(out.run_id, "val_loss")}
    best_file = find_checkpoint(run_dir, "best")
    assert best_file == run_dir / BEST_DIR / "model.pt"
    best_step = min(val, key=val.get)
    assert torch.load(best_file, weights_only=True)["val_loss"] == pytest.approx(val[best_step])
    assert load_model(run_dir, pick="best")[2] == best_step
    assert load_model(run_dir, pick="last")[2] == 8

    # EMA on: model.pt holds the average, state.pt the training weights, and they differ
    last = run_dir / "checkpoint_local_000008"
    handed_out = torch.load(last / "model.pt", weights_only=True)["model"]
    trained = torch.load(last / "state.pt", weights_only=True)["train_model"]
    assert any(not torch.equal(handed_out[k], trained[k]) for k in trained)

    # a local-mode run started again continues from its latest checkpoint: drop the last one and rerun; the
    # resumed half (steps 5-8) must land on the same training weights and the same average
    shutil.rmtree(last)
    run_training(cfg, local_mode=True)
    assert torch.load(last / "state.pt", weights_only=True)["state"]["step"] == 8
    assert [m.value for m in client.get_metric_history(out.run_id, "resumed_from_step")] == [4.0]
    again = torch.load(last / "model.pt", weights_only=True)["model"]
    again_trained = torch.load(last / "state.pt", weights_only=True)["train_model"]
    for k in trained:
        torch.testing.assert_close(again_trained[k], trained[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(again[k], handed_out[k], rtol=1e-6, atol=1e-7)
    finished = run_training(cfg, local_mode=True)  # started again with no step left: it reports no checkpoint
    assert finished.checkpoint == last  # and `simba-ttm train` said "latest checkpoint: none"

    # Continuing needs settings the checkpoints can continue (more steps are fine, another lr or size is not), and
    # the mode that wrote the newest checkpoint: Ray Train would start over and log steps 1-8 again.
    for changed, key in (("train.lr=1e-2", "train.lr: 0.003 -> 0.01"), ("model.d_model=96", "model.d_model: ")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            run_training(ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), [changed])), local_mode=True)
    with pytest.raises(ConfigError, match="trained in local mode .* up to step 8"):
        run_training(cfg)
    longer = ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), ["train.max_steps=9"]))
    assert run_training(longer, local_mode=True).run_id == out.run_id
    assert max(m.step for m in client.get_metric_history(out.run_id, "lr")) == 9


def test_the_progress_line_reads_well():
    progress = Progress("paper", max_steps=1000, flops_per_token=6e6, peak_flops_total=1e12, start_step=0)
    metrics = {"train_loss": 5.12345, "lr": 1e-4, "tokens_per_s": 50_000.0}
    metrics["mfu"] = progress.mfu(metrics["tokens_per_s"])
    assert metrics["mfu"] == pytest.approx(0.3)
    line = progress.line(10, metrics)
    assert line.startswith("[paper] step 10/1000 | loss 5.1235 | lr 1.00e-04 | 50,000 tok/s | MFU 30.0% | ETA ")
