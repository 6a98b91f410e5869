"""Where the jobs' Ray comes from."""

from __future__ import annotations

import os

import ray

# Path resolution lives in pipelines/paths.py (no Ray import: every job checks its paths before Ray starts).


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
