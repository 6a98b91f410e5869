"""`simba-ttm train --config FILE [key=value ...]`: train a decoder on Ray Train, logging to MLflow.

Connects to RAY_ADDRESS (or `--address`), else starts a local Ray. Starting the same experiment name with
the same train.storage_path again resumes from its latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.paths import TRAIN_PATHS
from ray_jobs.common import USAGE_ERRORS, add_config_args, fail, job_config

PROG = "simba-ttm train"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_config_args(parser, "model.arch=transformer", address=True)
    parser.add_argument("--local-mode", action="store_true", help="run the loop in this process (debugging)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    try:
        cfg = job_config(args, TRAIN_PATHS, tracking=True)
    except USAGE_ERRORS as err:
        return fail(PROG, err)

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch, Ray and MLflow takes.
    from pipelines.runtime import ensure_ray
    from pipelines.train.driver import check_before_ray, run_training

    try:
        check_before_ray(cfg, local_mode=args.local_mode)  # data present, a run folder that can continue
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    ensure_ray(args.address)
    try:
        out = run_training(cfg, local_mode=args.local_mode)
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    print(f"finished: MLflow run {out.run_id}")
    print(f"latest checkpoint: {out.checkpoint or 'none'}")
    print(f"browse runs: mlflow ui --backend-store-uri {out.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
