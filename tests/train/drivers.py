"""Driver processes for the kill -9 tests: `python -m ray_jobs.X` on the test session's Ray runtime, killed with
SIGKILL (its whole process group) once a condition on its files holds, then started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def driver_command(module: str, cfg_path: Path, ray_session) -> list[str]:
    """The job's command line, attached to the test session's Ray runtime."""
    address = ray_session.get_runtime_context().gcs_address
    return [sys.executable, "-m", module, "--config", str(cfg_path), "--address", address]


def driver_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def kill9_once(cmd: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], what: str, timeout: float):
    """Start `cmd` in its own process group, poll `ready()` and SIGKILL the group as soon as it holds. Fails with
    the driver's log if the driver exits first, and with `what` if `ready()` never holds within `timeout` s."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"{what} within {timeout:.0f} s"
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rerun(cmd: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    """Run `cmd` to the end; fails with its output tails if it does not exit 0."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
