"""`simba-ttm train --config FILE [key=value ...]`: train a decoder on Ray Train, logging to MLflow.

Connects to RAY_ADDRESS (or `--address`), else starts a local Ray. Starting the same experiment name with
the same train.storage_path again resumes from its latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys

from configs import ConfigError, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import TRAIN_PATHS, absolute_paths, check_job_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm train", description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.arch=transformer")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--local-mode", action="store_true", help="run the loop in this process (debugging)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Inside a Ray job, relative paths would land in Ray's temporary copy of the working directory.
        check_job_paths(cfg, TRAIN_PATHS, tracking=True)
        cfg = absolute_paths(cfg)  # against $SIMBA_TTM_ROOT when set
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm train: {err}", file=sys.stderr)
        return 2

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch, Ray and MLflow takes.
    from pipelines.runtime import ensure_ray
    from pipelines.train.driver import check_before_ray, run_training

    try:
        check_before_ray(cfg)  # data present and large enough, before Ray starts
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm train: {err}", file=sys.stderr)
        return 2
    ensure_ray(args.address)
    try:
        out = run_training(cfg, local_mode=args.local_mode)
    except (ConfigError, MissingWeightsError) as err:
        print(f"simba-ttm train: {err}", file=sys.stderr)
        return 2
    checkpoint = out.result.checkpoint.path if out.result.checkpoint else "none"
    print(f"finished: MLflow run {out.run_id}")
    print(f"latest checkpoint: {checkpoint}")
    print(f"browse runs: mlflow ui --backend-store-uri {out.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
