"""The one error every pretrained loader raises when its weights are not on this machine.

Weights are never downloaded (DESIGN.md decision 4): a miss names the config setting to change. This module
imports nothing heavy, so a job can catch `MissingWeightsError` without importing dac, demucs or transformers.
"""

from __future__ import annotations

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
