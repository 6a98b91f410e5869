"""`simba-ttm preprocess --config FILE [key=value ...]`: Jamendo audio -> DAC tokens + T5 embeddings (Parquet).

Connects to the Ray cluster in RAY_ADDRESS (or `--address`), else starts a local one. A rerun skips tracks
that already have an outcome on disk. The summary is printed and saved next to the tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from pipelines.paths import PREPROCESS_PATHS
from ray_jobs.common import USAGE_ERRORS, add_config_args, fail, job_config

PROG = "simba-ttm preprocess"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_config_args(parser, "preprocess.codec_actors=2", address=True)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    try:
        cfg = job_config(args, PREPROCESS_PATHS)
    except USAGE_ERRORS as err:
        return fail(PROG, err)

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch and Ray takes.
    from pipelines.preprocess.graph import run_preprocess

    try:  # the config's files and the models are checked before Ray starts
        summary = run_preprocess(cfg, address=args.address)
    except USAGE_ERRORS as err:
        return fail(PROG, err)
    print(summary.table())
    out = Path(cfg.data.tokens_dir).parent / "preprocess_summary.json"
    out.write_text(json.dumps(asdict(summary), indent=2))
    print(f"tokens: {Path(cfg.data.tokens_dir).resolve()}\nrejects: {Path(cfg.preprocess.rejects_dir).resolve()}")
    print(f"summary saved to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
