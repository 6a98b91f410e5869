"""`simba-ttm evaluate` end to end on Ray with tiny models, and training's own evaluation (train.eval_every)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from configs.loading import apply_overrides
from configs.schema import ExperimentConfig
from eval.evaluate import EVAL_CHECKPOINT_DIR, METRICS_FILE, run_checkpoints
from eval.scoring import METRIC_KEYS
from ray_jobs import evaluate

STEPS = 20


@pytest.fixture(scope="module")
def trained(preprocessed, tiny_evalset, tiny_eval, tmp_path_factory):
    """A SiMBA run of 20 steps that evaluates itself at step 20 and keeps weights-only checkpoints at 10 and 20."""
    from pipelines.train.driver import run_training
    from tests.conftest import start_local_ray

    start_local_ray()
    tmp = tmp_path_factory.mktemp("evaluated_run")
    d = preprocessed[0].to_dict()
    d["train"].update(storage_path=str(tmp / "runs"), max_steps=STEPS, warmup_steps=2, checkpoint_every=10)
    d["train"].update(val_every=10, generate_every=0, batch_size=2, eval_every=20, eval_checkpoint_every=10)
    d["data"]["max_frames"] = 64
    d["generation"].update(seconds=0.5, batch_size=2)
    d["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    d["eval"].update(clap=tiny_eval["clap"], passt=tiny_eval["passt"], fad_embedder="clap", set_dir=str(tiny_evalset),
                     seconds=1.0, limit=4, batch_size=4, gpus_per_actor=0.0)  # fmt: skip
    cfg = ExperimentConfig.from_dict(apply_overrides(d, ["name=evaluated"]))
    out = run_training(cfg, local_mode=True)
    return out, tmp / "runs" / "evaluated"


def _history(out, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(out.tracking_uri).get_metric_history(out.run_id, key)
    return sorted((m.step, m.value) for m in history)


def test_training_evaluates_itself_and_keeps_eval_checkpoints(trained):
    out, run_dir = trained
    for key in METRIC_KEYS:
        assert [s for s, _ in _history(out, key)] == [STEPS], key
    summary = json.loads((run_dir / "eval" / f"step_{STEPS:06d}" / METRICS_FILE).read_text())
    assert summary["during_training"] and summary["clips"] == 4 and summary["step"] == STEPS
    assert summary["metrics"]["eval/fad"] == pytest.approx(_history(out, "eval/fad")[0][1])
    assert len(list((run_dir / "eval" / f"step_{STEPS:06d}" / "clips").glob("*.wav"))) == 4
    assert sorted(p.name for p in (run_dir / EVAL_CHECKPOINT_DIR).iterdir()) == ["step_000010", "step_000020"]
    assert list(run_checkpoints(run_dir)) == [10, 20]  # Ray Train's and the eval checkpoints, once per step


def test_evaluate_run_does_what_is_missing_then_nothing(trained, capsys):
    out, run_dir = trained
    assert evaluate.main(["--run", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "already evaluated (metrics.json present): steps 20" in text
    summary = json.loads((run_dir / "eval" / "step_000010" / METRICS_FILE).read_text())
    assert set(summary["metrics"]) == {*METRIC_KEYS, "eval/clap_reference"}
    assert summary["mlflow_run_id"] == out.run_id
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    assert summary["clips"] == 4 and summary["seconds_per_clip"] == 1.0
    for key in METRIC_KEYS:  # at each checkpoint's step, in the run that trained it
        history = _history(out, key)
        assert [s for s, _ in history] == [10, STEPS], key
        assert dict(history)[10] == pytest.approx(summary["metrics"][key])

    assert evaluate.main(["--run", str(run_dir)]) == 0
    assert "nothing new to evaluate" in capsys.readouterr().out
    assert [s for s, _ in _history(out, "eval/fad")] == [10, STEPS]


def test_evaluate_one_checkpoint_into_a_folder(trained, tmp_path):
    _, run_dir = trained
    target = tmp_path / "one"
    code = evaluate.main(["--checkpoint", str(run_dir / EVAL_CHECKPOINT_DIR / "step_000010"), "--out", str(target),
                          "--limit", "2", "--cfg", "1.0"])  # fmt: skip
    assert code == 0
    summary = json.loads((target / METRICS_FILE).read_text())
    assert summary["clips"] == 2 and summary["generation"]["cfg_scale"] == 1.0 and summary["step"] == 10
    assert len(list((target / "clips").glob("*.wav"))) == 2 and len(list((target / "clips").glob("*.png"))) == 2


def test_missing_parts_are_named_before_anything_runs(trained, tiny_eval, tmp_path, capsys):
    _, run_dir = trained
    ckpt = str(run_dir / EVAL_CHECKPOINT_DIR / "step_000010")
    assert evaluate.main(["--checkpoint", ckpt, "--evalset", str(tmp_path / "none")]) == 2
    assert "make-evalset" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert evaluate.main(["--run", str(empty)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    config = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
    code = evaluate.main(["--checkpoint", ckpt, "--config", str(config), f"eval.clap={tmp_path / 'no_clap'}"])
    assert code == 2 and "eval.clap" in capsys.readouterr().err
    no_passt = [f"eval.clap={tiny_eval['clap']}", f"eval.passt={tmp_path / 'no_passt.pt'}"]
    code = evaluate.main(["--checkpoint", ckpt, "--config", str(config), *no_passt])
    assert code == 2 and "eval.passt" in capsys.readouterr().err


def test_the_clips_do_not_depend_on_how_generation_is_split(trained, ray_session):
    import dataclasses

    import numpy as np
    import ray

    from eval.evaluate import launch_generation
    from pipelines.train.checkpoints import saved_config

    _, run_dir = trained
    file = run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt"
    e = saved_config(file).eval
    clips = {}
    for generators in (1, 3):
        e = dataclasses.replace(e, generators=generators, limit=None)
        refs = launch_generation(file, 1, 6, e, Path(e.set_dir), {"seconds": 0.3}, "cpu")
        assert len(refs) == generators
        clips[generators] = np.concatenate(ray.get(refs))
    assert clips[1].shape[0] == 6
    np.testing.assert_array_equal(clips[1], clips[3])
