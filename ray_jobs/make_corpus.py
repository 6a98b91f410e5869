"""`simba-ttm make-corpus --out DIR --tracks N [--bad] [--seed S]`: a small synthesized MTG-Jamendo-format corpus.

Writes DIR/raw_30s_cleantags_50artists.tsv, DIR/audio/NN/ID.mp3, DIR/song_describer.csv, DIR/captions.jsonl
and DIR/corpus.json (each track's kind). With --bad, one example of every bad input is added. A DIR that already
holds a corpus is refused: the two would mix.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.paths import check_job_paths, resolve_path
from pipelines.preprocess.corpus.writer import CorpusExistsError, make_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm make-corpus", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (created if missing; not one holding a corpus)")
    parser.add_argument("--tracks", type=int, required=True, help="number of music tracks (bad inputs come on top)")
    parser.add_argument("--bad", action="store_true", help="add one corrupt/empty/missing/NaN/short/malformed/"
                        "uncaptioned example each")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same corpus")
    parser.add_argument("--min-seconds", type=float, default=60.0, help="shortest music track (at least 30)")
    parser.add_argument("--max-seconds", type=float, default=100.0, help="longest music track")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that render and encode tracks in parallel")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        check_job_paths(args={"--out": args.out})  # not into Ray's temporary copy of the working directory
        make_corpus(
            resolve_path(args.out),  # against $SIMBA_TTM_ROOT when set
            args.tracks,
            bad=args.bad,
            seed=args.seed,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            workers=args.workers,
        )
    except (CorpusExistsError, NotADirectoryError) as err:  # checked before anything is written
        print(f"simba-ttm make-corpus: --out {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a ConfigError from check_job_paths too
        print(f"simba-ttm make-corpus: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
