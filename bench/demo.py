"""Wall time of `make demo` after install, with its stage breakdown (issue 9 target: <= 180 s on 2 cores).

Runs `python -m ray_jobs.demo` (what `make demo` runs) in a fresh temporary directory, so nothing cached from
an earlier run (corpus, tiny models, tokens, checkpoints, MLflow store) is reused, and reads the breakdown the
demo writes with `--timings`: corpus, tiny models, Ray start, preprocessing, each training (split into the
worker's setup, optimizer steps, validation, samples, checkpoints, and Ray Train starting and stopping the
worker group) and generation.

    python bench/demo.py [--runs 1] [--json]

The machine's CPU is printed with the figures; `farm-bench` gives the spread over repeated runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 180.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown'} x {os.cpu_count()}"


def one_run(keep_log: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="simba-demo-bench-") as tmp:
        timings = Path(tmp) / "timings.json"
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        cmd = [sys.executable, "-m", "ray_jobs.demo", "--config", str(REPO / "configs/debug.yaml"), "--timings",
               str(timings)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if keep_log is not None:
            keep_log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"the demo failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        stages = json.loads(timings.read_text())
    return {"wall": wall, **stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--log", type=Path, help="keep the last run's output here")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the medians")
    args = parser.parse_args()

    runs = [one_run(args.log) for _ in range(args.runs)]
    keys = list(runs[0])
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    print(f"make demo (python -m ray_jobs.demo) on {cpu_name()}, {args.runs} run(s), median seconds:")
    for key in keys:
        if key in ("wall", "total"):
            continue
        indent = "    " if "/" in key else "  "
        print(f"{indent}{key:<40} {median[key]:7.1f}")
    print(f"  {'demo total (its own clock)':<40} {median['total']:7.1f}")
    print(f"  {'wall, process start to exit':<40} {median['wall']:7.1f}   target <= {TARGET_S:.0f}")
    if args.json:
        print(json.dumps({"cpu": cpu_name(), "runs": args.runs, "wall_s": median["wall"], "stages_s": median}))


if __name__ == "__main__":
    main()
