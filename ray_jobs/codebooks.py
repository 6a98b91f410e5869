"""`simba-ttm codebooks [--config FILE] [key=value ...] [--evalset DIR] [--limit N] [--out DIR]`: the paper's Fig. 1.

Decodes each eval-set reference's stored DAC codes from its first k = 1..9 codebooks and measures, per k, the FAD
of the reconstructions against the original references (`eval.fad_embedder`) and their CLAP score against the
captions, with the original references' CLAP score as the ceiling. Writes codebooks.png (two panels) and
codebooks.csv to --out, prints a table, and logs a new MLflow run tagged `simba_ttm.kind=codebooks` (metrics
`codebooks/fad` and `codebooks/clap` at step k, the PNG and CSV as artifacts) in the config's experiment.

The eval set defaults to `eval.set_dir` (written by `simba-ttm make-evalset`) and its first `eval.limit` captions;
the models are `preprocess.codec`, `eval.clap` and `eval.vggish` (the latter only for `eval.fad_embedder: vggish`);
without --config, the defaults (the paper's models, by id, from the local caches).
It runs in this process (see eval/codebooks.py for the cost and how it would scale): `ray job submit ... --
simba-ttm codebooks ...` runs it on a GPU box, where the decodes and embeddings take minutes for the Song Describer
set.
"""

from __future__ import annotations

import argparse
import sys
import time

from configs import ConfigError
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import check_output_folder, resolve_path
from ray_jobs.common import add_config_args, fail, job_config

PROG = "simba-ttm codebooks"
PNG, CSV = "codebooks.png", "codebooks.csv"
TINY_NOTE = "tiny random models (e.g. configs/debug.yaml): these numbers are not meaningful"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser, "eval.fad_embedder=clap", optional=True)
    parser.add_argument("--evalset", help="eval set folder (default: eval.set_dir)")
    parser.add_argument("--limit", type=int, help="the first N captions (default: eval.limit)")
    parser.add_argument("--out", default="outputs/codebooks", help="output folder (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    if args.limit is not None and args.limit < 1:
        return fail(PROG, f"--limit must be >= 1, got {args.limit}")
    try:
        outputs = {"--evalset": args.evalset, "--out": args.out}
        cfg = job_config(args, () if args.evalset else ("eval.set_dir",), tracking=True, outputs=outputs)
        check_output_folder("--out", args.out)
        evalset_dir = resolve_path(args.evalset) if args.evalset else resolve_path(cfg.eval.set_dir)
        out = resolve_path(args.out)
    except (ConfigError, FileNotFoundError) as err:
        return fail(PROG, err)
    limit = args.limit if args.limit is not None else cfg.eval.limit

    # Imported here: --help and a bad flag or config answer without the seconds that torch, dac and transformers take.
    import torch

    from eval.clap import Clap
    from eval.codebooks import codebook_sweep, log_to_mlflow, looks_tiny, write_csv
    from eval.fad import Vggish
    from eval.plots import codebooks_png
    from modeling.pretrained.codec import load_codec
    from pipelines.preprocess.evalset import read_evalset
    from pipelines.train.tracking import experiment_id, resolve_tracking_uri

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail(PROG, "--device cuda was given but no CUDA device is available")
    e = cfg.eval
    start = time.perf_counter()
    try:
        evalset = read_evalset(evalset_dir, limit)
        codec = load_codec(cfg.preprocess.codec, device=device, setting="preprocess.codec")
        clap = Clap(e.clap, device=device)
        vggish = Vggish(e.vggish, device=device) if e.fad_embedder == "vggish" else None
        tiny = looks_tiny(codec, clap.model)
        print(f"eval set {evalset_dir}: {len(evalset)} captions; decoding k = 1..9 codebooks on {device}")
        if tiny:
            print(f"NOTE: {TINY_NOTE}")
        result = codebook_sweep(
            evalset, codec, clap, fad_embedder=e.fad_embedder, vggish=vggish, seconds=e.seconds,
            batch_size=e.batch_size, progress=print,
        )  # fmt: skip
    except (MissingWeightsError, FileNotFoundError, ValueError) as err:
        return fail(PROG, err)
    elapsed = time.perf_counter() - start

    note = f"{result.n_captions} captions, {result.n_clips} clips of {result.seconds:g} s" + (
        f"; {TINY_NOTE}" if tiny else ""
    )
    png = codebooks_png(result.ks, result.fad, result.clap, result.clap_reference, out / PNG,
                        fad_label=f"FAD ({e.fad_embedder})", note=note)  # fmt: skip
    csv = write_csv(result, out / CSV)
    uri = resolve_tracking_uri(cfg)
    params = {
        "evalset": evalset_dir,
        "limit": limit,
        "codec": cfg.preprocess.codec,
        "clap": e.clap,
        "vggish": e.vggish if e.fad_embedder == "vggish" else "",
        "config_name": cfg.name,
        "tiny_models": tiny,
    }
    run_id = log_to_mlflow(result, uri, experiment_id(cfg, uri), [png, csv], params)

    print(result.table())
    print(f"{result.n_captions} captions, {result.n_clips} distinct clips, {elapsed:.1f} s")
    if tiny:
        print(f"NOTE: {TINY_NOTE}")
    print(f"figure: {png}\npoints: {csv}")
    print(f"MLflow: run {run_id} (tag simba_ttm.kind=codebooks) in experiment {cfg.mlflow.experiment!r} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
