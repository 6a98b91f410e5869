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

from configs import ConfigError, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import PREPROCESS_PATHS, absolute_paths, check_job_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm preprocess", description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. preprocess.codec_actors=2")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
        check_job_paths(cfg, PREPROCESS_PATHS)
        cfg = absolute_paths(cfg)  # against $SIMBA_TTM_ROOT when set
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm preprocess: {err}", file=sys.stderr)
        return 2

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch and Ray takes.
    from pipelines.preprocess.graph import run_preprocess
    from pipelines.runtime import ensure_ray

    ensure_ray(args.address)
    try:
        summary = run_preprocess(cfg)
    except (ConfigError, MissingWeightsError, FileNotFoundError) as err:
        print(f"simba-ttm preprocess: {err}", file=sys.stderr)
        return 2
    print(summary.table())
    out = Path(cfg.data.tokens_dir).parent / "preprocess_summary.json"
    out.write_text(json.dumps(asdict(summary), indent=2))
    print(f"tokens: {Path(cfg.data.tokens_dir).resolve()}\nrejects: {Path(cfg.preprocess.rejects_dir).resolve()}")
    print(f"summary saved to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
