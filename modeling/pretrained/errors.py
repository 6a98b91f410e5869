"""The one error every pretrained loader raises when its weights are not on this machine.

Weights are never downloaded (DESIGN.md decision 4): a miss names the config setting to change. This module
imports nothing heavy, so a job can catch `MissingWeightsError` without importing dac, demucs or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message names the config setting to change."""


def missing(what: str, where: str | Path, setting: str, hint: str) -> MissingWeightsError:
    """The one error every pretrained loader raises when its weights are absent."""
    if isinstance(where, Path):
        where = where.expanduser().absolute()
    return MissingWeightsError(
        f"{what} not found at {where}; set {setting}=<{hint}> "
        "(weights are never downloaded: put them there or point the setting at a local copy)"
    )


def weights_file(
    path_or_id: str | Path, what: str, setting: str, hint: str, cached: Callable[[str], Path | None] | None = None
) -> Path:
    """The local file a loader reads: `path_or_id` itself when it exists, else where the library's download cache
    keeps it (`cached(id)`, None for an id the library does not know); `missing(...)` when no file is there."""
    spec = str(path_or_id)
    path = Path(spec).expanduser()
    if not path.exists() and cached is not None:
        path = cached(spec) or path
    if not path.is_file():
        raise missing(what, path, setting, hint)
    return path
