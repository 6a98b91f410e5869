"""What the job entrypoints share: the `--config FILE [key=value ...]` arguments, reading and checking that config
before anything slow is imported, and a user's mistake (a bad flag value, config, path or missing weights) ending
the job with exit status 2 and one line on stderr that names the job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping

from configs import ConfigError, ExperimentConfig, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import absolute_paths, check_job_paths

# The errors that mean "change the command or the config", never "a bug": reported in one line, exit status 2.
USAGE_ERRORS = (ConfigError, MissingWeightsError, FileNotFoundError)


def fail(prog: str, message: object) -> int:
    """Print `prog: message` on stderr; returns 2, the exit status of a usage error."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def add_config_args(
    parser: argparse.ArgumentParser,
    example: str,
    *,
    config: str | None = None,
    optional: bool = False,
    address: bool = False,
) -> None:
    """`--config FILE` (required unless `config` gives a default, or `optional`: then the defaults, the paper's
    setup), `key=value` overrides (`example` shows one) and, with `address`, `--address` of the Ray cluster.
    Parse with `parser.parse_intermixed_args`: `parse_args` takes the positional overrides in one run, so an
    override after a later flag was an "unrecognized argument"."""
    default = f" (default: {config})" if config else " (default: the defaults, the paper's setup)" if optional else ""
    parser.add_argument(
        "--config",
        required=config is None and not optional,
        default=config,
        help=f"experiment YAML, e.g. configs/paper.yaml{default}",
    )
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")
    if address:
        parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")


def job_config(
    args: argparse.Namespace,
    paths: Iterable[str] = (),
    *,
    tracking: bool = False,
    outputs: Mapping[str, str | None] | None = None,
) -> ExperimentConfig:
    """The config of `--config` with its overrides, its `paths` (and the MLflow store with `tracking`, and the
    flags in `outputs`) checked for where a job runs, relative paths made absolute (against $SIMBA_TTM_ROOT when
    set). Raises ConfigError or FileNotFoundError, before Ray or torch is imported."""
    cfg = load_config(args.config, args.overrides)
    # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
    check_job_paths(cfg, tuple(paths), tracking=tracking, args=outputs)
    return absolute_paths(cfg)
