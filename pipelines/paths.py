"""Where relative paths resolve: the project root ($SIMBA_TTM_ROOT) or the working directory.

A job submitted with `ray job submit --working-dir .` runs in Ray's copy of that directory
(`<Ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/`). A relative output path
written there is lost: the next submission after a code change gets a new, empty copy (no resume, a new MLflow
store), and Ray deletes old copies when its cache fills or the machine reboots. A relative input path (the
tokens) is looked for there and not found. So every job checks its paths before it starts (`check_job_paths`):
inside such a copy, without a root, a relative path is refused with one message that names the keys.

With $SIMBA_TTM_ROOT set (an absolute path; `~` is the home of the machine the job runs on), every relative path
of the config, the relative SQLite store of MLflow and the jobs' `--out` and `--checkpoint` resolve against it
instead of the working directory, in a job or not. `--config` and `--prompts` files are still read from the
working directory: they travel with the code. Absolute paths are used as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from configs.schema import ConfigError, ExperimentConfig

ROOT_ENV = "SIMBA_TTM_ROOT"
EXAMPLE_ROOT = "/srv/simba"

# Config values that are always paths, and values that are a path when one exists (else a model id).
PATH_KEYS = {
    "data": ("tokens_dir", "split_file"),
    "preprocess": ("metadata_tsv", "audio_root", "exclude_csv", "rejects_dir", "caption_file", "caption_cache_dir"),
    "train": ("storage_path",),
    "eval": ("set_csv", "set_audio_root", "set_dir"),
}
PATH_OR_ID_KEYS = {
    "preprocess": ("separator", "codec", "text_encoder", "caption_audio_model", "caption_text_model"),
    "eval": ("clap", "passt", "vggish"),
}

# What the jobs read and write, for `check_job_paths` (model settings may be hub ids: they are not checked).
PREPROCESS_PATHS = ("preprocess.metadata_tsv", "preprocess.audio_root", "preprocess.exclude_csv",
                    "preprocess.caption_file", "preprocess.caption_cache_dir", "data.tokens_dir",
                    "preprocess.rejects_dir", "data.split_file")  # fmt: skip
TRAIN_PATHS = ("data.tokens_dir", "train.storage_path")  # and the MLflow store
EVALSET_PATHS = ("eval.set_csv", "eval.set_audio_root", "eval.set_dir")

SQLITE = "sqlite:///"
# The job config that Ray's job supervisor gives a submitted job's entrypoint (ray/_private/runtime_env/
# constants.py); RAY_JOB_ID is not set for it (the supervisor strips Ray's internal flags).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RAY_PKG_PREFIX = "_ray_pkg_"


def project_root(environ: Mapping[str, str] | None = None) -> Path | None:
    """$SIMBA_TTM_ROOT as an absolute path (`~` expanded), or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(ROOT_ENV, "").strip()
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_absolute():
        raise ConfigError(f"${ROOT_ENV} must be an absolute path (relative paths resolve against it), got {value!r}")
    return root


def resolve_path(path: str | Path) -> Path:
    """`path` made absolute: against $SIMBA_TTM_ROOT when set, else against the working directory."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (project_root() or Path.cwd()) / p
    return p.resolve()


def resolve_path_or_id(value: str) -> str:
    """A model setting: the absolute path when `value` names an existing file or folder, else `value` (an id)."""
    path = resolve_path(value)
    return str(path) if path.exists() else value


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a folder (created if missing): "is a file" or "lies under a file, F"; None
    when it can."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())  # a relative path's last parent is "."
    except OSError as err:  # a folder on the way that cannot be read
        return f"cannot be checked ({err.strerror})"
    if existing.is_dir():
        return None
    return "is a file" if existing == path else f"lies under a file, {existing}"


def check_output_folder(flag: str, path: str | Path | None) -> None:
    """Raise ConfigError when the output folder `path` given by `flag` cannot be one (see `folder_problem`): said
    before any work, rather than as a traceback when the results are written."""
    problem = folder_problem(resolve_path(path)) if path else None
    if problem:
        raise ConfigError(f"{flag} {path} {problem}: name a folder (created if missing)")


def root_dir() -> Path:
    """Where relative paths resolve now: $SIMBA_TTM_ROOT, else the working directory (resolved)."""
    return (project_root() or Path.cwd()).resolve()


def inside(value: str, root: str | Path) -> str | None:
    """`value` relative to `root` when it is an absolute path inside it, else None (elsewhere, or a model id)."""
    path = Path(value)
    return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else None


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every path of `cfg` made absolute (`resolve_path`): Ray workers run in their own directories."""
    d = cfg.to_dict()
    for section, keys in PATH_KEYS.items():
        for key in keys:
            if d[section][key]:
                d[section][key] = str(resolve_path(d[section][key]))
    for section, keys in PATH_OR_ID_KEYS.items():
        for key in keys:
            if d[section][key]:
                d[section][key] = resolve_path_or_id(d[section][key])
    return ExperimentConfig.from_dict(d)


def _relative_sqlite(uri: str) -> str | None:
    """The relative file of a `sqlite:///relative.db` URI, else None (absolute, in memory, not SQLite)."""
    if not uri.startswith(SQLITE):
        return None
    file = uri[len(SQLITE) :]
    return None if not file or file.startswith("/") or file.startswith(":memory:") else file


def check_store_exists(uri: str) -> None:
    """FileNotFoundError naming the setting when `uri` is a SQLite store whose file does not exist: MLflow would
    create an empty store there and find none of the runs a job reads or logs into."""
    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE) :]).is_file():
        raise FileNotFoundError(
            f"no MLflow store at {uri}: set mlflow.tracking_uri in --config, or $MLFLOW_TRACKING_URI"
        )


def absolute_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI with a relative SQLite store made absolute (`resolve_path`)."""
    file = _relative_sqlite(uri)
    return uri if file is None else SQLITE + str(resolve_path(file))


def ray_package_copy(cwd: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The folder of Ray's copy of a job's working directory that `cwd` lies in, or None.

    Ray unpacks every `working_dir` it downloads under `<session>/runtime_resources/working_dir_files/`. In
    case that layout changes, a submitted job's own config (which names its package, `gcs://_ray_pkg_<hash>.zip`)
    is the second sign. A `local://` working directory, or an entrypoint that changes to another folder, is not a
    copy.
    """
    parts = Path(os.getcwd() if cwd is None else cwd).parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == ("runtime_resources", "working_dir_files"):
            return Path(*parts[: i + 3])
    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    try:
        working_dir = json.loads(raw)["runtime_env"]["working_dir"] if raw else None
    except (ValueError, KeyError, TypeError):
        working_dir = None
    if isinstance(working_dir, str) and not working_dir.startswith("local://"):
        package = working_dir.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]  # gcs://_ray_pkg_<hash>.zip
        for i, part in enumerate(parts):
            if part == package and part.startswith(RAY_PKG_PREFIX):
                return Path(*parts[: i + 1])
    return None


def _tracking_source(cfg: ExperimentConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return "mlflow.tracking_uri"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default"


def check_job_paths(
    cfg: ExperimentConfig | None = None,
    keys: Iterable[str] = (),
    *,
    tracking: bool = False,
    args: Mapping[str, str | None] | None = None,
) -> None:
    """Refuse, before anything starts, relative paths that would resolve inside Ray's copy of the working directory.

    Args:
        cfg: the job's config.
        keys: the `section.key` paths of `cfg` the job reads or writes (e.g. "train.storage_path").
        tracking: the job logs to MLflow: a relative SQLite store counts too.
        args: command-line paths the job reads or writes, by flag (e.g. {"--out": "outputs/generate"}).
    Raises:
        ConfigError naming every offending key with an absolute example, when the working directory is a Ray
        package copy and $SIMBA_TTM_ROOT is unset (an invalid root is refused anywhere).
    """
    if project_root() is not None:
        return
    package = ray_package_copy()
    if package is None:
        return
    bad, fixes = [], []
    for name in dict.fromkeys(keys):  # in order, once each
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value and not Path(value).expanduser().is_absolute():
            bad.append(f"{name}={value}")
            fixes.append(f"{name}={Path(EXAMPLE_ROOT) / value}")
    if tracking:
        uri = cfg.mlflow.resolved_tracking_uri()
        file = _relative_sqlite(uri)
        if file is not None:
            bad.append(f"the MLflow store {uri} (from {_tracking_source(cfg)})")
            fixes.append(f"mlflow.tracking_uri={SQLITE}{Path(EXAMPLE_ROOT) / file}")
    for flag, value in (args or {}).items():
        if value and not Path(value).expanduser().is_absolute():
            bad.append(f"{flag} {value}")
            fixes.append(f"{flag} {Path(EXAMPLE_ROOT) / value}")
    if bad:
        env = json.dumps({"env_vars": {ROOT_ENV: EXAMPLE_ROOT}})
        raise ConfigError(
            f"relative paths in a Ray job would resolve inside Ray's temporary copy of the working directory "
            f"({package}), which the next submission replaces and Ray deletes: {', '.join(bad)}. "
            f"Set ${ROOT_ENV} to a persistent folder on the cluster for relative paths to resolve against "
            f"(--runtime-env-json '{env}', beside your excludes), or give absolute paths: {' '.join(fixes)}"
        )
