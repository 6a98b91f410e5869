"""`simba-ttm evaluate` end to end on Ray with tiny models, and training's own evaluation (train.eval_every)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from configs.loading import apply_overrides
from configs.schema import ExperimentConfig
from eval.evaluate import EVAL_CHECKPOINT_DIR, METRICS_FILE, run_checkpoints
from eval.scoring import METRIC_KEYS
from pipelines.train.checkpoints import saved_config
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
    d["mlflow"]["tracking_uri"] = None  # the store comes from $MLFLOW_TRACKING_URI, during training only
    d["eval"].update(clap=tiny_eval["clap"], passt=tiny_eval["passt"], fad_embedder="clap", set_dir=str(tiny_evalset),
                     seconds=1.0, limit=4, batch_size=4, gpus_per_actor=0.0)  # fmt: skip
    cfg = ExperimentConfig.from_dict(apply_overrides(d, ["name=evaluated"]))
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        out = run_training(cfg, local_mode=True)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
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
    # The store the run used is in its checkpoints: `evaluate` (below, without $MLFLOW_TRACKING_URI) finds the run.
    saved = saved_config(run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt")
    assert saved.mlflow.tracking_uri == out.tracking_uri == f"sqlite:///{run_dir.parents[1] / 'mlflow.db'}"


def test_evaluate_run_does_what_is_missing_then_nothing(trained, capsys):
    out, run_dir = trained
    assert evaluate.main(["--run", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "already evaluated with these settings: steps 20" in text
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
    """A side evaluation (`--out`, here on a subset) is written there only: logged at the step, it replaced the
    numbers Fig. 3 draws with subset ones while the step's metrics.json still said the full set."""
    out, run_dir = trained
    logged = {key: _history(out, key) for key in METRIC_KEYS}
    target = tmp_path / "one"
    code = evaluate.main(["--checkpoint", str(run_dir / EVAL_CHECKPOINT_DIR / "step_000010"), "--out", str(target),
                          "--limit", "2", "--cfg", "1.0"])  # fmt: skip
    assert code == 0
    summary = json.loads((target / METRICS_FILE).read_text())
    assert summary["clips"] == 2 and summary["generation"]["cfg_scale"] == 1.0 and summary["step"] == 10
    assert summary["mlflow_run_id"] is None
    assert len(list((target / "clips").glob("*.wav"))) == 2 and len(list((target / "clips").glob("*.png"))) == 2
    assert {key: _history(out, key) for key in METRIC_KEYS} == logged


def test_one_checkpoint_follows_the_step_record_like_a_run(trained, capsys):
    """`--checkpoint` without `--out` evaluates the step for Fig. 3: the same settings again are skipped, other
    settings are refused unless --force (it silently replaced the step's numbers in MLflow)."""
    out, run_dir = trained
    ckpt = str(run_dir / EVAL_CHECKPOINT_DIR / f"step_{STEPS:06d}")  # evaluated during training, with eval.limit=4
    logged = _history(out, "eval/fad")
    assert evaluate.main(["--checkpoint", ckpt]) == 0
    assert "nothing new to evaluate (--force evaluates again)" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", ckpt, "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"step {STEPS}: clips: 4 -> 2" in err and "--force" in err
    assert _history(out, "eval/fad") == logged

    # --force evaluates it again and logs the new numbers once, even when its record said "not logged yet" (it
    # logged the old numbers first, then the new ones: two values at one step)
    record = run_dir / "eval" / f"step_{STEPS:06d}" / METRICS_FILE
    record.write_text(json.dumps({**json.loads(record.read_text()), "mlflow_run_id": None}))
    assert evaluate.main(["--checkpoint", ckpt, "--force"]) == 0
    assert len(_history(out, "eval/fad")) == len(logged) + 1
    assert json.loads(record.read_text())["mlflow_run_id"] == out.run_id


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
    """Nor on the order the batches arrive in; progress shows batch by batch (it said nothing until every clip of
    every checkpoint was done: hours for the paper's eval set)."""
    import dataclasses

    import numpy as np

    from eval.evaluate import gather_generated, launch_generation

    _, run_dir = trained
    file = run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt"
    e = saved_config(file).eval
    clips = {}
    for generators in (1, 2):  # batches of 2: one task of 3 batches, or tasks of 2 batches and 1 (seeds by batch)
        e = dataclasses.replace(e, generators=generators, limit=None)
        refs = launch_generation(file, 2, 6, e, Path(e.set_dir), {"seconds": 0.3}, "cpu")
        assert len(refs) == generators
        lines = []
        (clips[generators],) = gather_generated([refs], log=lines.append, every=0.0)
        counts = [int(line.split()[0]) for line in lines]
        assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts)) > 1, lines
        assert lines[-1].strip().startswith(f"6 clips generated, {generators}/{generators} task(s) done")
    assert clips[1].shape[0] == 6
    # the same tokens (another seed gives other audio altogether); the codec's float sums differ at 1e-8 with the
    # tasks' thread counts (4 CPUs for one task, 2 each for two)
    np.testing.assert_allclose(clips[1], clips[2], rtol=0, atol=1e-5)


def _copy_run(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "eval" / "step_000010", ignore_errors=True)  # whether or not a test above evaluated it
    return dest


def test_a_step_counts_as_done_only_with_the_same_settings(trained, tmp_path):
    """`evaluate --run` plans per step: no metrics.json -> to do; the same settings -> done; other settings ->
    refused before anything runs, or (force) to do again; done but never logged -> logged now."""
    import dataclasses

    from eval.evaluate import CheckpointEvaluator
    from eval.runs import StaleEvaluationError, plan_run

    out, run_dir = trained
    run_dir = _copy_run(run_dir, tmp_path / "evaluated")
    e = saved_config(run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt").eval
    same = CheckpointEvaluator(e, Path(e.set_dir), {}, "cpu", out.tracking_uri)
    plan = plan_run(same, run_dir)
    assert list(plan.todo) == [10] and plan.done == [STEPS] and not plan.changed and not plan.unlogged

    fewer = CheckpointEvaluator(dataclasses.replace(e, limit=3), Path(e.set_dir), {"cfg_scale": 1.0}, "cpu")
    with pytest.raises(StaleEvaluationError, match="step 20: ") as err:
        plan_run(fewer, run_dir)
    assert "clips: 4 -> 3" in str(err.value) and "sampling.cfg_scale: 3.0 -> 1.0" in str(err.value)
    assert "--force" in str(err.value)
    forced = plan_run(fewer, run_dir, force=True)
    assert list(forced.todo) == [10, STEPS] and list(forced.changed) == [STEPS]

    # Evaluated while the training run could not be found: logged once it can be.
    metrics_file = run_dir / "eval" / f"step_{STEPS:06d}" / METRICS_FILE
    summary = json.loads(metrics_file.read_text())
    metrics_file.write_text(json.dumps({**summary, "mlflow_run_id": None}))
    assert plan_run(same, run_dir).unlogged == [STEPS]
    # Evaluated by an earlier version, which recorded no settings: kept as done, whatever is asked; force redoes it.
    metrics_file.write_text(json.dumps({k: v for k, v in summary.items() if k != "settings"}))
    assert plan_run(fewer, run_dir).unrecorded == [STEPS] and list(plan_run(fewer, run_dir, force=True).todo) == [
        10,
        20,
    ]

    # A checkpoint trained where its MLflow store was: on a machine without that file, no run is found and no
    # empty store is created (metrics.json records mlflow_run_id null; a --run with the store logs it later).
    cfg = saved_config(run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt")
    elsewhere = dataclasses.replace(
        cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=f"sqlite:///{tmp_path}/a.db")
    )
    assert fewer.training_run(elsewhere) == (None, f"sqlite:///{tmp_path}/a.db") and not (tmp_path / "a.db").exists()


def test_metrics_json_appears_only_once_the_numbers_are_logged(trained, tmp_path):
    """A crash while logging leaves no metrics.json (the step is done again), and keeps the one it replaces."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from eval.evaluate import log_recorded, record
    from pipelines.preprocess.evalset import read_evalset
    from pipelines.train.tracking import RunLogger

    out, run_dir = trained
    cfg = saved_config(run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt")
    evalset = read_evalset(cfg.eval.set_dir, 3)
    step_out = tmp_path / "step"
    (step_out / "clips").mkdir(parents=True)
    (step_out / "clips" / "9999_from_before.wav").write_bytes(b"old")
    (step_out / METRICS_FILE).write_text('{"step": 7}')
    metrics = {"eval/fad": 1.0, "eval/kld": 2.0, "eval/kld_reverse": 2.5, "eval/clap": 0.5}
    args = (7, cfg, cfg.eval, evalset, evalset.audio, metrics, {"generate": 1.0}, None, cfg.generation, {})
    no_such_run = RunLogger("0" * 32, out.tracking_uri)
    with pytest.raises(Exception, match="0" * 32):
        record(step_out, *args[:7], no_such_run, *args[8:])
    assert not (step_out / METRICS_FILE).exists()
    assert [json.loads(f.read_text()) for f in step_out.glob("metrics.replaced-*.json")] == [{"step": 7}]
    assert sorted(f.name for f in (step_out / "clips").glob("*.wav"))[0].startswith("0000_")  # the old clip went
    assert len(list((step_out / "clips").glob("*.wav"))) == 3

    record(step_out, *args)  # no MLflow run found: written, saying so
    summary = json.loads((step_out / METRICS_FILE).read_text())
    assert summary["metrics"] == metrics and summary.get("mlflow_run_id") is None
    assert summary["generation"]["top_k"] == cfg.generation.top_k  # the sampling settings used, not only overrides

    client = MlflowClient(out.tracking_uri)
    run_id = client.create_run(client.get_run(out.run_id).info.experiment_id).info.run_id
    log_recorded(step_out, RunLogger(run_id, out.tracking_uri))
    assert json.loads((step_out / METRICS_FILE).read_text())["mlflow_run_id"] == run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/fad")] == [(7, 1.0)]
    logged = {a.path for a in client.list_artifacts(run_id, "eval/step_000007")}
    assert f"eval/step_000007/{METRICS_FILE}" in logged and len(logged) == 1 + 2 * 3  # 3 clips: WAV + spectrogram
    assert np.isfinite(summary["metrics"]["eval/fad"])


def test_settings_the_eval_set_cannot_take_are_refused_before_anything_runs(trained, tmp_path, capsys):
    import shutil

    out, run_dir = trained
    ckpt = str(run_dir / EVAL_CHECKPOINT_DIR / "step_000010")
    saved = saved_config(Path(ckpt) / "model.pt")
    config = [str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")]
    config += [f"eval.{k}={getattr(saved.eval, k)}" for k in ("clap", "passt", "set_dir")]
    config += [f"preprocess.codec={saved.preprocess.codec}"]
    refused = {
        "longer than the reference clips": ["--checkpoint", ckpt, "--seconds", "60"],
        "needs at least 2 clips": ["--checkpoint", ckpt, "--limit", "1"],  # FAD on CLAP embeddings
        "cfg_scale": ["--checkpoint", ckpt, "--cfg", "-1"],
        "batch_size": ["--checkpoint", ckpt, "--batch-size", "0"],
        "--out and --pick go with --checkpoint": ["--run", str(run_dir), "--out", str(tmp_path / "x")],
        "--force goes without --out": ["--checkpoint", ckpt, "--out", str(tmp_path / "x"), "--force"],
        "preprocess.codec": ["--checkpoint", ckpt, "--config", *config, f"preprocess.codec={tmp_path / 'no.pth'}"],
        "no MLflow store": ["--checkpoint", ckpt, "--config", *config, f"mlflow.tracking_uri=sqlite:///{tmp_path}/typo.db"],
    }  # fmt: skip
    for message, argv in refused.items():
        assert evaluate.main(argv) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert evaluate.main(["--checkpoint", str(not_a_checkpoint)]) == 2
    assert "not a simba-ttm checkpoint" in capsys.readouterr().err

    storage = tmp_path / "storage"  # two runs' folders side by side: --run takes one
    for name in ("a", "b"):
        shutil.copytree(run_dir, storage / name, ignore=shutil.ignore_patterns("eval"))
    assert evaluate.main(["--run", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of 2 runs" in err and str(storage / "a") in err and str(storage / "b") in err


def test_training_checks_its_own_evaluation_before_ray(trained, tmp_path):
    from configs.schema import ConfigError
    from modeling.pretrained.errors import MissingWeightsError
    from pipelines.train.driver import check_before_ray

    _, run_dir = trained
    cfg = saved_config(run_dir / EVAL_CHECKPOINT_DIR / "step_000010" / "model.pt")
    d = cfg.to_dict()
    assert check_before_ray(cfg, local_mode=True)  # as trained: fine
    bad = {
        "longer than the reference clips": (ConfigError, ["eval.seconds=60"]),
        "needs at least 2 clips": (ConfigError, ["eval.limit=1"]),
        "eval.passt": (MissingWeightsError, [f"eval.passt={tmp_path / 'none.pt'}"]),
    }
    for message, (error, overrides) in bad.items():
        with pytest.raises(error, match=message):
            check_before_ray(ExperimentConfig.from_dict(apply_overrides(d, overrides)), local_mode=True)
