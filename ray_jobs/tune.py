"""`simba-ttm tune --config FILE [key=value ...] [--resume]`: a hyperparameter search on Ray Tune, in MLflow.

Every trial trains the config with the values `tune.space` draws (the same training loop as `simba-ttm train`);
ASHA stops the worse ones early. Prints a ranked table of the trials and writes `best.yaml` (a full config:
`simba-ttm train --config .../best.yaml` trains the winner). The sweep is one MLflow run, every trial a run
nested under it. A sweep whose driver died continues with `--resume` (same config, same name).
"""

from __future__ import annotations

import argparse
import sys

from configs import ConfigError, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import TRAIN_PATHS, absolute_paths, check_job_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm tune", description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML with a tune section, e.g. configs/tune.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. tune.num_samples=8")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep of this name (Tuner.restore)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # the search space is checked here, before Ray
        check_job_paths(cfg, TRAIN_PATHS, tracking=True)
        cfg = absolute_paths(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm tune: {err}", file=sys.stderr)
        return 2

    # Imported after the config is read: --help and a bad config answer at once, without importing torch and Ray.
    from pipelines.runtime import ensure_ray
    from pipelines.train.sweep import check_sweep, ranked_table, run_sweep

    try:
        check_sweep(cfg, args.resume)  # a space, a metric the trials report, data, the sweep folder
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm tune: {err}", file=sys.stderr)
        return 2
    ensure_ray(args.address)
    try:
        out = run_sweep(cfg, resume=args.resume)
    except (ConfigError, MissingWeightsError) as err:
        print(f"simba-ttm tune: {err}", file=sys.stderr)
        return 2
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
