"""Where the jobs' Ray comes from."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from configs.schema import ExperimentConfig


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address`, else to RAY_ADDRESS (set for a job submitted with `ray job submit`), else start a
    local Ray for this process.

    Never `ray.init()` without an address: that attaches to whatever cluster `ray start` last recorded on the
    machine, and when that one is gone it waits minutes for it before failing.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # At least 4 logical CPUs: the preprocessing actor pools (separator, codec, text encoder) each hold one,
        # and the decode tasks need one more, so a 2-core laptop would otherwise wait forever for a CPU.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4))


# Config values that are always paths, and values that are a path when one exists (else a model id).
_PATHS = {
    "data": ("tokens_dir",),
    "preprocess": ("metadata_tsv", "audio_root", "exclude_csv", "rejects_dir", "caption_file"),
    "train": ("storage_path",),
}
_PATH_OR_ID = {"preprocess": ("separator", "codec", "text_encoder", "caption_model")}


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Ray workers run in their own directories: resolve every path of `cfg` against the driver's."""
    d = cfg.to_dict()
    for section, keys in _PATHS.items():
        for key in keys:
            if d[section][key]:
                d[section][key] = str(Path(d[section][key]).expanduser().resolve())
    for section, keys in _PATH_OR_ID.items():
        for key in keys:
            value = d[section][key]
            if value and Path(value).expanduser().exists():
                d[section][key] = str(Path(value).expanduser().resolve())
    return ExperimentConfig.from_dict(d)
