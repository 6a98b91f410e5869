"""`simba-ttm tune --config FILE [key=value ...] [--resume]`: a hyperparameter search on Ray Tune, in MLflow.

Every trial trains the config with the values `tune.space` draws (the same training loop as `simba-ttm train`);
ASHA stops the worse ones early. Prints a ranked table of the trials and writes `best.yaml` (a full config:
`simba-ttm train --config .../best.yaml` trains the winner). The sweep is one MLflow run, every trial a run
nested under it. A sweep whose driver died continues with `--resume` (same config, same name).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.paths import TRAIN_PATHS
from ray_jobs.common import USAGE_ERRORS, add_config_args, fail, job_config

PROG = "simba-ttm tune"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_config_args(parser, "tune.num_samples=8 (the YAML needs a tune section: configs/tune.yaml)", address=True)
    parser.add_argument("--resume", action="store_true", help="continue the sweep of this name (Tuner.restore)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    try:
        cfg = job_config(args, TRAIN_PATHS, tracking=True)  # the search space is checked here, before Ray
    except USAGE_ERRORS as err:
        return fail(PROG, err)

    # Imported after the config is read: --help and a bad config answer at once, without importing torch and Ray.
    from pipelines.runtime import ensure_ray
    from pipelines.train.sweep import check_sweep, ranked_table, run_sweep

    try:
        check_sweep(cfg, args.resume)  # a space, a metric the trials report, data, the sweep folder
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    ensure_ray(args.address)
    try:
        out = run_sweep(cfg, resume=args.resume)
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    print()
    print(ranked_table(out.rows, cfg))
    print()
    print(f"MLflow parent run {out.parent_run_id}; browse: mlflow ui --backend-store-uri {out.tracking_uri}")
    if out.best_yaml is None:
        print("no trial finished with a finite metric: no best.yaml", file=sys.stderr)
        return 1
    print(f"best config: {out.best_yaml}  (train it: simba-ttm train --config {out.best_yaml})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
