"""`simba-ttm make-evalset --config FILE [key=value ...]`: caption CSV + audio -> the eval set (Parquet).

Reads eval.set_csv (the Song Describer Dataset layout: caption_id, track_id, caption, path, ...) and the audio under
eval.set_audio_root; writes one row per caption (its Flan-T5 embedding, an eval.seconds reference clip from
eval.reference_offset at 44.1 kHz mono, and the clip's DAC codes) to eval.set_dir, replacing what was there.
Connects to the Ray cluster in RAY_ADDRESS (or `--address`), else starts a local one.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.paths import EVALSET_PATHS
from ray_jobs.common import USAGE_ERRORS, add_config_args, fail, job_config

PROG = "simba-ttm make-evalset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_config_args(parser, "eval.set_dir=data/evalset", address=True)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    try:
        cfg = job_config(args, EVALSET_PATHS)
    except USAGE_ERRORS as err:
        return fail(PROG, err)

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch and Ray takes.
    from pipelines.preprocess.make_evalset import run_make_evalset

    try:  # the CSV, the folders and the weights are checked before Ray starts
        summary = run_make_evalset(cfg, address=args.address)
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    print(summary.table())
    if not summary.written:
        print(f"{PROG}: no caption was kept; {cfg.eval.set_dir} was left as it was", file=sys.stderr)
        return 1
    print(f"eval set: {summary.set_dir} ({summary.kept} captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
