"""`simba-ttm figure3`: two training runs in a real MLflow store -> PNG + CSV of exactly what was logged, and a
comparison run holding both."""

from __future__ import annotations

import csv
import time

import matplotlib.image
import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from configs import load_config
from pipelines.train.tracking import start_or_resume_run
from ray_jobs import figure3 as job

SIMBA_EVAL_STEPS = (20, 40, 60)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with two training runs created as training creates them: `demo-simba` with losses and eval
    metrics (a val_loss step logged twice, as a resumed run does), `demo-transformer` with losses only.
    Shared by the tests of this module (creating a store costs seconds): none changes what another reads."""
    tmp_path = tmp_path_factory.mktemp("figure3")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    rng = np.random.default_rng(0)
    ids = {}
    for arch in ("simba", "transformer"):
        cfg = load_config("debug", [f"model.arch={arch}", f"name=demo-{arch}", f"mlflow.tracking_uri={uri}"])
        run_id = start_or_resume_run(cfg, str(tmp_path / "runs" / arch), uri)
        now = int(time.time() * 1000)
        metrics = [Metric("train_loss", float(7 - 0.05 * s + rng.normal(0, 0.1)), now, s) for s in range(1, 61)]
        metrics += [Metric("val_loss", float(7 - 0.04 * s), now, s) for s in (20, 40, 60)]
        if arch == "simba":
            metrics += [Metric("val_loss", 9.5, now - 1000, 40)]  # an older value at step 40: the newer one wins
            for key, base in (("eval/fad", 12.0), ("eval/kld", 2.0), ("eval/clap", 0.1)):
                metrics += [Metric(key, base + float(rng.normal()), now, s) for s in SIMBA_EVAL_STEPS]
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id)
        ids[arch] = run_id
    return uri, ids, tmp_path


def expected_points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """MLflow's history, one value per step: the one with the latest timestamp."""
    latest = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        latest[m.step] = m.value
    return sorted(latest.items())


def test_figure3_plots_exactly_the_logged_histories(store, monkeypatch, capsys, tmp_path):
    uri, ids, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "fig"
    # one run by name, one by id
    assert job.main(["--runs", "demo-simba", ids["transformer"], "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "demo-transformer" in printed.err and "no eval metrics" in printed.err

    client = MlflowClient(uri)
    with (out / job.CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run_id", "run_name", "arch", "metric", "step", "value"]
    for arch, run_id in ids.items():
        for key in ("eval/fad", "eval/kld", "eval/clap", "train_loss", "val_loss"):
            got = [(int(r["step"]), float(r["value"])) for r in rows if r["run_id"] == run_id and r["metric"] == key]
            assert got == expected_points(client, run_id, key), (arch, key)
        mine = [r for r in rows if r["run_id"] == run_id]
        assert {(r["run_name"], r["arch"]) for r in mine} == {(f"demo-{arch}", arch)}
    simba = [r for r in rows if r["run_id"] == ids["simba"]]
    assert [int(r["step"]) for r in simba if r["metric"] == "eval/fad"] == list(SIMBA_EVAL_STEPS)
    assert [float(r["value"]) for r in simba if r["metric"] == "val_loss" and r["step"] == "40"] == [7 - 0.04 * 40]
    assert not [r for r in rows if r["run_id"] == ids["transformer"] and r["metric"].startswith("eval/")]

    image = matplotlib.image.imread(out / job.PNG)
    print("PNG shape", image.shape)
    assert 600 <= image.shape[0] <= 1500 and 900 <= image.shape[1] <= 2000
    assert image[..., :3].std() > 0.05  # something was drawn

    comparisons = client.search_runs(
        [client.get_run(ids["simba"]).info.experiment_id], "tags.`simba_ttm.kind` = 'figure3'"
    )
    assert len(comparisons) == 1
    comparison = comparisons[0]
    assert comparison.data.params["runs"] == f"{ids['simba']},{ids['transformer']}"
    assert comparison.data.params["archs"] == "simba,transformer"
    assert comparison.data.tags["simba_ttm.source_runs"] == f"{ids['simba']},{ids['transformer']}"
    artifacts = {a.path for a in client.list_artifacts(comparison.info.run_id)}
    assert artifacts == {job.PNG, job.CSV}
    logged_csv = client.download_artifacts(comparison.info.run_id, job.CSV, str(tmp_path / "dl"))
    assert open(logged_csv).read() == (out / job.CSV).read_text()
    assert comparison.info.run_id in printed.out and str(out / job.PNG) in printed.out


def test_a_name_means_one_training_run_or_is_refused(store, monkeypatch, capsys, tmp_path):
    uri, _, _ = store
    client = MlflowClient(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config("debug", ["name=twice", f"mlflow.tracking_uri={uri}"])
    first = start_or_resume_run(cfg, str(tmp_path / "runs" / "a"), uri)
    time.sleep(0.01)  # start times in ms: let them differ
    # The folder deleted and trained anew: the first run is superseded, the name means the new one.
    again = start_or_resume_run(cfg, str(tmp_path / "runs" / "a"), uri, resume=False)
    # A run of another tool, with the same name, in another experiment: not a training run.
    other = client.create_run(client.create_experiment("elsewhere"), run_name="twice").info.run_id
    for run_id in (first, again, other):
        client.log_batch(run_id, metrics=[Metric("train_loss", 1.0, int(time.time() * 1000), 1)])
    assert job.main(["--runs", "twice", "--out", str(tmp_path / "fig")]) == 0
    rows = list(csv.DictReader((tmp_path / "fig" / job.CSV).open()))
    assert {r["run_id"] for r in rows} == {again}

    # The same config trained into another storage folder: two training runs by that name, refused.
    time.sleep(0.01)
    newer = start_or_resume_run(cfg, str(tmp_path / "runs" / "b"), uri)
    assert job.main(["--runs", "twice", "--out", str(tmp_path / "fig2")]) == 2
    err = capsys.readouterr().err
    assert "names 2 runs" in err and again in err and newer in err and first not in err and other not in err
    assert not (tmp_path / "fig2").exists()
    assert job.main(["--runs", newer, "--out", str(tmp_path / "fig2")]) == 0  # an id chooses


def test_an_unknown_run_is_a_clear_error(store, monkeypatch, capsys, tmp_path):
    uri, ids, _ = store
    tmp = tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert job.main(["--runs", "demo-simba", "no-such-run", "--out", str(tmp / "fig")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "'no-such-run'" in err
    assert "demo-simba" in err and "demo-transformer" in err and ids["transformer"] in err  # what exists
    assert not (tmp / "fig").exists()
    # a well-formed id that is not in the store, and a store that does not exist
    assert job.main(["--runs", "0" * 32, "--out", str(tmp / "fig")]) == 2
    assert "0" * 32 in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'absent.db'}")
    assert job.main(["--runs", "demo-simba", "--out", str(tmp / "fig")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp / "absent.db").exists()


def test_an_out_that_is_a_file_is_refused_in_one_line(store, monkeypatch, capsys, tmp_path):
    uri, _, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    readme = tmp_path / "README.md"
    readme.write_text("a file\n")
    for out, says in ((readme, "is a file"), (readme / "fig", f"lies under a file, {readme}")):
        assert job.main(["--runs", "demo-simba", "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"simba-ttm figure3: --out {out} {says}: name a folder (created if missing)\n"
    assert readme.read_text() == "a file\n"
