"""Where relative paths resolve ($SIMBA_TTM_ROOT, else the working directory), how a Ray package copy is recognised,
and what a job refuses inside one. In process, without Ray: a fake package copy is a folder with Ray's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import ConfigError, load_config
from pipelines.paths import (
    ROOT_ENV,
    TRAIN_PATHS,
    absolute_paths,
    absolute_tracking_uri,
    check_job_paths,
    project_root,
    ray_package_copy,
    resolve_path,
    resolve_path_or_id,
)

JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (ROOT_ENV, "MLFLOW_TRACKING_URI", JOB_CONFIG):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """The working directory is Ray's copy of a submitted job's working_dir, laid out as Ray 2.60 lays it out."""
    pkg = tmp_path / "session_2025-01-01_00-00-00_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    return pkg


def test_project_root(monkeypatch, tmp_path):
    assert project_root() is None
    monkeypatch.setenv(ROOT_ENV, "  ")
    assert project_root() is None
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert project_root() == tmp_path
    monkeypatch.setenv(ROOT_ENV, "~/simba")
    assert project_root() == Path.home() / "simba"
    monkeypatch.setenv(ROOT_ENV, "simba")
    with pytest.raises(ConfigError, match=r"\$SIMBA_TTM_ROOT must be an absolute path.*'simba'"):
        project_root()


def test_resolve_path_against_the_root_else_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("runs/x") == tmp_path / "runs" / "x"
    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))
    assert resolve_path("runs/x") == root / "runs" / "x"
    assert resolve_path(tmp_path / "abs") == tmp_path / "abs"  # absolute paths are kept
    assert resolve_path("~/x") == Path.home().resolve() / "x"
    (root / "models").mkdir(parents=True)
    assert resolve_path_or_id("models") == str(root / "models")  # a path when it exists under the root
    assert resolve_path_or_id("google/flan-t5-base") == "google/flan-t5-base"  # else an id


def test_absolute_paths_resolve_every_config_path_against_the_root(monkeypatch, tmp_path):
    root = tmp_path / "root"
    (root / "data/demo/pretrained").mkdir(parents=True)
    (root / "data/demo/pretrained/dac_tiny.pth").touch()
    (root / "data/demo/pretrained/clap_tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ROOT_ENV, str(root))
    cfg = absolute_paths(load_config("debug", ["preprocess.caption_file=captions.jsonl"]))
    assert cfg.train.storage_path == str(root / "runs/debug")
    assert cfg.data.tokens_dir == str(root / "data/demo/tokens")
    assert cfg.preprocess.rejects_dir == str(root / "data/demo/rejects")
    assert cfg.preprocess.metadata_tsv == str(root / "data/demo/corpus/raw_30s_cleantags_50artists.tsv")
    assert cfg.preprocess.caption_file == str(root / "captions.jsonl")
    assert cfg.preprocess.codec == str(root / "data/demo/pretrained/dac_tiny.pth")  # exists: a path
    assert cfg.preprocess.separator == "data/demo/pretrained/htdemucs_tiny.th"  # missing: left as it is (an id)
    assert cfg.eval.clap == str(root / "data/demo/pretrained/clap_tiny")
    assert cfg.eval.vggish == "vggish"


def test_tracking_uri_resolves_relative_sqlite_against_the_root(monkeypatch, tmp_path):
    from pipelines.train.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    cfg = load_config("debug")
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"  # the default, in the working directory
    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/a.db")
    assert resolve_tracking_uri(cfg) == f"sqlite:///{root}/stores/a.db"
    assert (
        resolve_tracking_uri(load_config("debug", ["mlflow.tracking_uri=sqlite:///b.db"])) == f"sqlite:///{root}/b.db"
    )
    for kept in (f"sqlite:///{tmp_path}/c.db", "sqlite:///:memory:", "http://127.0.0.1:5000", "databricks"):
        assert absolute_tracking_uri(kept) == kept


def test_package_copy_by_its_folder(tmp_path):
    pkg = tmp_path / "ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab12"
    assert ray_package_copy(pkg, {}) == pkg
    assert ray_package_copy(pkg / "configs", {}) == pkg  # an entrypoint that changed into a subfolder
    remote = tmp_path / "ray/session_1/runtime_resources/working_dir_files/s3_bucket_code"  # a remote working_dir
    assert ray_package_copy(remote, {}) == remote
    assert ray_package_copy(tmp_path / "project", {}) is None
    assert ray_package_copy(tmp_path / "runtime_resources", {}) is None


def test_package_copy_by_the_job_config(tmp_path):
    """The job config that Ray gives a submitted job's entrypoint names its package: a second sign."""

    def job(working_dir: str | None) -> dict[str, str]:
        env = {} if working_dir is None else {"working_dir": working_dir}
        return {JOB_CONFIG: json.dumps({"runtime_env": env, "metadata": {}})}

    elsewhere = tmp_path / "tmp-ray/pkgs/_ray_pkg_ab12"  # a layout this version of Ray does not use
    assert ray_package_copy(elsewhere / "sub", job("gcs://_ray_pkg_ab12.zip")) == elsewhere
    assert ray_package_copy(elsewhere, job("gcs://_ray_pkg_ffff.zip")) is None  # another package
    assert ray_package_copy(elsewhere, job("gcs://_ray_pkg_ab1234.zip")) is None
    assert ray_package_copy(tmp_path / "srv/simba", job("gcs://_ray_pkg_ab12.zip")) is None  # `cd` elsewhere first
    assert ray_package_copy(tmp_path / "code", job(f"local://{tmp_path}/code")) is None  # used in place
    assert ray_package_copy(elsewhere, job(None)) is None
    assert ray_package_copy(elsewhere, {JOB_CONFIG: "not json"}) is None


def test_check_refuses_relative_paths_in_a_package_copy(package):
    cfg = load_config("debug", ["data.tokens_dir=/srv/tokens"])
    with pytest.raises(ConfigError) as err:
        check_job_paths(cfg, TRAIN_PATHS, tracking=True, args={"--out": "outputs/x", "--checkpoint": "/srv/ckpt"})
    message = str(err.value)
    print(message)
    assert f"({package})" in message
    assert (
        "train.storage_path=runs/debug, the MLflow store sqlite:///mlflow.db (from the default), --out outputs/x."
        in message
    )
    assert "data.tokens_dir" not in message and "--checkpoint" not in message  # absolute: fine
    assert """--runtime-env-json '{"env_vars": {"SIMBA_TTM_ROOT": "/srv/simba"}}'""" in message
    assert "train.storage_path=/srv/simba/runs/debug mlflow.tracking_uri=sqlite:////srv/simba/mlflow.db" in message
    assert message.endswith("--out /srv/simba/outputs/x")


def test_check_names_where_the_mlflow_store_comes_from(package, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    with pytest.raises(ConfigError, match=r"the MLflow store sqlite:///env.db \(from \$MLFLOW_TRACKING_URI\)"):
        check_job_paths(load_config("debug"), (), tracking=True)
    with pytest.raises(ConfigError, match=r"the MLflow store sqlite:///cfg.db \(from mlflow.tracking_uri\)"):
        check_job_paths(load_config("debug", ["mlflow.tracking_uri=sqlite:///cfg.db"]), (), tracking=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: nothing local to lose
    check_job_paths(load_config("debug", ["train.storage_path=/srv/runs"]), TRAIN_PATHS[1:], tracking=True)


def test_check_passes_with_a_root_absolute_paths_or_outside_a_package(package, monkeypatch, tmp_path):
    cfg = load_config("debug")
    absolute = load_config("debug", ["data.tokens_dir=/srv/t", "train.storage_path=/srv/r",
                                     "mlflow.tracking_uri=sqlite:////srv/m.db"])  # fmt: skip
    check_job_paths(absolute, TRAIN_PATHS, tracking=True, args={"--out": "/srv/out", "--checkpoint": None})
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "root"))
    check_job_paths(cfg, TRAIN_PATHS, tracking=True, args={"--out": "outputs"})
    monkeypatch.setenv(ROOT_ENV, "relative/root")
    with pytest.raises(ConfigError, match="must be an absolute path"):
        check_job_paths(cfg, TRAIN_PATHS)
    monkeypatch.delenv(ROOT_ENV)
    monkeypatch.chdir(tmp_path)
    check_job_paths(cfg, TRAIN_PATHS, tracking=True, args={"--out": "outputs"})
