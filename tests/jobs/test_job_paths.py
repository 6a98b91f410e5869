"""Every job refuses relative paths inside Ray's copy of the working directory before it starts anything, and
resolves them against $SIMBA_TTM_ROOT when that is set. In process: the job's main() in a folder laid out as Ray's
package copy (tests/jobs/test_job_submit.py submits real jobs)."""

from __future__ import annotations

import importlib

import pytest

from pipelines.paths import ROOT_ENV

PREFIX = "relative paths in a Ray job would resolve inside Ray's temporary copy of the working directory"
# job -> (argv, the relative paths its message names)
JOBS = {
    "train": (
        ["--config", "debug"],
        ["data.tokens_dir=data/demo/tokens", "train.storage_path=runs/debug", "the MLflow store sqlite:///mlflow.db"],
    ),
    "tune": (
        ["--config", "tune_debug"],
        ["data.tokens_dir=data/demo/tokens", "train.storage_path=runs/debug", "the MLflow store sqlite:///mlflow.db"],
    ),
    "preprocess": (
        ["--config", "debug"],
        ["preprocess.metadata_tsv=data/demo/corpus/", "preprocess.audio_root=", "preprocess.exclude_csv=",
         "data.tokens_dir=", "preprocess.rejects_dir="],
    ),
    "make_evalset": (
        ["--config", "debug"],
        ["eval.set_csv=data/demo/corpus/song_describer.csv", "eval.set_audio_root=", "eval.set_dir=data/demo/evalset"],
    ),
    "demo": (
        ["--config", "debug"],
        ["preprocess.metadata_tsv=", "train.storage_path=runs/debug", "the MLflow store", "--out outputs/demo"],
    ),
    "generate": (
        ["--checkpoint", "runs/debug", "--prompt", "calm piano"],
        ["--checkpoint runs/debug", "--out outputs/generate"],
    ),
    "make_corpus": (["--out", "corpus", "--tracks", "1"], ["--out corpus"]),
}  # fmt: skip


@pytest.fixture
def package(tmp_path, monkeypatch):
    for name in (ROOT_ENV, "MLFLOW_TRACKING_URI", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    return pkg


@pytest.mark.parametrize("job", list(JOBS))
def test_job_refuses_relative_paths_in_a_package_copy(job, package, capsys):
    argv, named = JOBS[job]
    assert importlib.import_module(f"ray_jobs.{job}").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"simba-ttm {job.replace('_', '-')}: {PREFIX} ({package}), "), err
    for text in named:
        assert text in err, (text, err)
    assert "SIMBA_TTM_ROOT" in err
    assert list(package.iterdir()) == []  # nothing was written before the refusal


def test_make_corpus_writes_under_the_root(package, tmp_path, monkeypatch):
    from ray_jobs.make_corpus import main

    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "root"))
    assert (
        main(["--out", "corpus", "--tracks", "1", "--min-seconds", "30", "--max-seconds", "30", "--workers", "1"]) == 0
    )
    assert (tmp_path / "root" / "corpus" / "raw_30s_cleantags_50artists.tsv").is_file()
    assert list(package.iterdir()) == []


def test_evaluate_without_a_config_checks_the_checkpoints_own_store(package, tmp_path, capsys):
    """Without --config, evaluate logs to the store the checkpoint's config names; a relative one (an earlier
    version's checkpoint) would be a new store inside the package copy, and the numbers would never reach the run."""
    from configs import load_config
    from modeling.builders import build_model
    from pipelines.train.checkpoints import save_model
    from ray_jobs import evaluate

    cfg = load_config("debug")
    save_model(tmp_path / "ckpt", build_model(cfg.model), cfg, 5)
    assert evaluate.main(["--checkpoint", str(tmp_path / "ckpt" / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert PREFIX in err and "the MLflow store sqlite:///mlflow.db" in err, err


def test_the_console_script_fails_without_a_job(capsys):
    from ray_jobs import cli

    assert cli.main([]) == 2 and "simba-ttm <job>" in capsys.readouterr().err  # a script that lost its job name
    assert cli.main(["--help"]) == 0 and "simba-ttm <job>" in capsys.readouterr().out
    assert cli.main(["no-such-job"]) == 2


@pytest.mark.parametrize(
    "job, argv",
    [
        ("generate", ["--checkpoint", "runs/none", "--prompt", "calm piano"]),
        ("evaluate", ["--checkpoint", "runs/none"]),
        ("codebooks", []),
        ("figure3", ["--runs", "a"]),
        ("demo", []),
    ],
)
def test_an_output_folder_that_is_a_file_is_refused_up_front(job, argv, tmp_path, capsys):
    """The results used to be lost to a FileExistsError / NotADirectoryError traceback once they were written."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    main = importlib.import_module(f"ray_jobs.{job}").main
    for out, problem in ((a_file, "is a file"), (a_file / "figures", f"lies under a file, {a_file}")):
        assert main([*argv, "--out", str(out)]) == 2
        assert f"--out {out} {problem}: name a folder" in capsys.readouterr().err
