"""`simba-ttm make-evalset --config FILE [key=value ...]`: caption CSV + audio -> the eval set (Parquet).

Reads eval.set_csv (the Song Describer Dataset layout: caption_id, track_id, caption, path, ...) and the audio under
eval.set_audio_root; writes one row per caption (its Flan-T5 embedding, an eval.seconds reference clip from
eval.reference_offset at 44.1 kHz mono, and the clip's DAC codes) to eval.set_dir, replacing what was there.
Connects to the Ray cluster in RAY_ADDRESS (or `--address`), else starts a local one.
"""

from __future__ import annotations

import argparse
import sys

from configs import ConfigError, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import EVALSET_PATHS, absolute_paths, check_job_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm make-evalset", description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.set_dir=data/evalset")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
        check_job_paths(cfg, EVALSET_PATHS)
        cfg = absolute_paths(cfg)  # against $SIMBA_TTM_ROOT when set
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm make-evalset: {err}", file=sys.stderr)
        return 2

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch and Ray takes.
    from pipelines.preprocess.make_evalset import run_make_evalset

    try:  # the CSV, the folders and the weights are checked before Ray starts
        summary = run_make_evalset(cfg, address=args.address)
    except (ConfigError, MissingWeightsError, FileNotFoundError) as err:
        print(f"simba-ttm make-evalset: {err}", file=sys.stderr)
        return 2
    print(summary.table())
    if not summary.written:
        print(f"simba-ttm make-evalset: no caption was kept; {cfg.eval.set_dir} was left as it was", file=sys.stderr)
        return 1
    print(f"eval set: {summary.set_dir} ({summary.kept} captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
