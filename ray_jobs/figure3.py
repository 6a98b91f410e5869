"""`simba-ttm figure3 --runs RUN [RUN ...] [--config FILE] [--out DIR]`: the paper's Fig. 3 from MLflow.

FAD, KLD and CLAP score (logged by `simba-ttm evaluate` at each checkpoint's optimizer step) against the step, one
line per run labelled with its decoder (`model.arch`) and run name, and a train/validation loss panel. Writes
figure3.png and figure3.csv (exactly the plotted points) to --out and logs both to a new MLflow run tagged
`simba_ttm.kind=figure3` in the first run's experiment. A RUN is a run id or a run name (a training run is named
after its config's `name`); a name that several training runs share is refused, listing their ids.

The MLflow store is the config's `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
(relative to $SIMBA_TTM_ROOT when set). Only MLflow is read: no model is loaded, nothing needs a GPU.
"""

from __future__ import annotations

import argparse
import sys

from configs import ConfigError, load_config
from pipelines.paths import check_job_paths, check_output_folder, check_store_exists, resolve_path
from ray_jobs.common import fail

PROG = "simba-ttm figure3"
PNG, CSV = "figure3.png", "figure3.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="MLflow run ids or run names")
    parser.add_argument("--config", help="experiment YAML whose mlflow section names the store (default: the defaults)")
    parser.add_argument("--out", default="outputs/figure3", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_job_paths(cfg, tracking=True, args={"--out": args.out})
        check_output_folder("--out", args.out)
        out = resolve_path(args.out)
    except (ConfigError, FileNotFoundError) as err:
        return fail(PROG, err)

    # Imported here: --help and a bad flag or config answer without the seconds these imports take.
    from mlflow.tracking import MlflowClient

    from eval.figure3 import EVAL_METRICS, RunNotFoundError, find_runs, load_series, log_comparison, write_csv
    from eval.plots import metrics_over_steps_png
    from pipelines.train.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    try:
        check_store_exists(uri)
    except FileNotFoundError as err:
        return fail(PROG, err)
    client = MlflowClient(tracking_uri=uri)
    try:
        runs, notes = find_runs(client, args.runs)
    except RunNotFoundError as err:
        return fail(PROG, err)
    series = load_series(client, runs)
    for s in series:
        if not any(s.series[key][0] for key in EVAL_METRICS):
            notes.append(f"run {s.run_name} ({s.run_id}) has no eval metrics yet (`simba-ttm evaluate` logs them)")
    if len({s.experiment_id for s in series}) > 1:
        notes.append(f"the runs span several experiments; the comparison run goes to {series[0].run_name}'s")
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)

    png = metrics_over_steps_png([(s.label, s.series) for s in series], out / PNG)
    csv = write_csv(series, out / CSV)
    run_id = log_comparison(client, series, [png, csv])
    for s in series:
        counts = ", ".join(f"{key} {len(s.series[key][0])}" for key in s.series)
        print(f"{s.label} ({s.run_id}): {counts} points")
    print(f"figure: {png}\npoints: {csv}")
    print(f"MLflow: comparison run {run_id} (tag simba_ttm.kind=figure3) in {uri}")
    print(f"browse it: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
