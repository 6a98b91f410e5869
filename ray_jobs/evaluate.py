"""`simba-ttm evaluate (--checkpoint PATH | --run RUN_DIR) [--config FILE [key=value ...]] [options]`: FAD, KLD, CLAP.

Generates `--seconds` (default eval.seconds, 10 s) per caption of the eval set (`simba-ttm make-evalset`), scores
the clips against the references, writes `<run>/eval/step_NNNNNN/metrics.json` with the clips, and logs
eval/fad, eval/kld, eval/kld_reverse and eval/clap to the MLflow run that trained the checkpoint, at its step.

--checkpoint takes a model file, a checkpoint folder or a run folder (its last checkpoint; `--pick best`);
--run evaluates every checkpoint of one run folder not yet evaluated with these settings (a rerun picks up where it
stopped). A step evaluated with other settings (another eval set, --limit, --seconds, --cfg, scoring models) stops
the job before anything runs, saying what differs; --force evaluates such steps again (the old metrics.json stays,
renamed metrics.replaced-<time>.json). `--checkpoint` follows the same rules for its step; with `--out DIR` it is a
side evaluation instead: always run, written to DIR, and not logged to the training run. The eval settings (models,
eval set, limit, actors) and the codec come from --config when given, else from the checkpoint's own config.
Generation runs as Ray tasks (one GPU each with --device cuda) and scoring as a Ray Data actor pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from configs import ConfigError, load_config
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import (
    absolute_paths,
    check_job_paths,
    check_output_folder,
    check_store_exists,
    resolve_path,
    resolve_path_or_id,
)
from ray_jobs.common import fail

PROG = "simba-ttm evaluate"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm evaluate", description=__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a model file, checkpoint folder or run folder")
    which.add_argument("--run", help="a run folder: evaluate each of its checkpoints not evaluated yet")
    parser.add_argument("--pick", choices=["last", "best"], default="last", help="with --checkpoint on a folder")
    parser.add_argument("--config", help="take the eval settings from this YAML (default: the checkpoint's)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of --config, e.g. eval.limit=50")
    parser.add_argument("--evalset", help="eval set folder (default: eval.set_dir)")
    parser.add_argument("--seconds", type=float, help="seconds per clip (default: eval.seconds)")
    parser.add_argument("--cfg", type=float, dest="cfg_scale", help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--limit", type=int, help="the first N captions (default: eval.limit)")
    parser.add_argument("--batch-size", type=int, help="captions per generation batch (default: the checkpoint's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with the compiled SiMBA step (CPU)")  # fmt: skip
    parser.add_argument(
        "--out", help="with --checkpoint: a side evaluation into this folder, not logged (default: <run>/eval/step_N)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="where generation runs (default: cuda if any)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="evaluate again steps evaluated with other settings (--checkpoint: its step, whatever its settings)",
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    if args.overrides and not args.config:
        return fail(PROG, "key=value overrides need --config (without it the checkpoint's own config is used)")
    if args.run and (args.out or args.pick != "last"):
        return fail(PROG, "--out and --pick go with --checkpoint; --run writes each step into <run>/eval/step_NNNNNN")
    if args.force and args.out:
        return fail(PROG, "--force goes without --out (an evaluation into --out always runs, and is not logged)")
    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
        paths = {"--checkpoint": args.checkpoint, "--run": args.run, "--out": args.out, "--evalset": args.evalset}
        # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
        check_job_paths(cfg, ("eval.set_dir",) if cfg else (), tracking=cfg is not None, args=paths)
        check_output_folder("--out", args.out)
        target = resolve_path(args.checkpoint or args.run)
        cfg = absolute_paths(cfg) if cfg else None
    except (ConfigError, FileNotFoundError) as err:
        return fail(PROG, err)

    # Imported here, after the arguments are read: --help and a bad flag answer at once.
    import torch

    from eval.evaluate import CheckpointEvaluator, check_cluster, format_metrics, run_checkpoints
    from eval.runs import evaluate_run, plan_run
    from eval.scoring import check_weights
    from modeling.pretrained.codec import codec_file
    from pipelines.runtime import ensure_ray
    from pipelines.train.checkpoints import find_checkpoint, run_folder, saved_config, saved_step
    from pipelines.train.tracking import resolve_tracking_uri

    try:
        if args.checkpoint:
            checkpoints = [find_checkpoint(target, args.pick)]
            plan = None
        else:
            found = run_checkpoints(target)
            checkpoints = list(found.values())
            if not checkpoints:
                raise FileNotFoundError(f"no checkpoint (model.pt) in {str(target)!r} or below")
        configs = [saved_config(c) for c in checkpoints]
        if cfg is None:  # the checkpoint's own store: inside a Ray job, a relative one would point into its copy
            check_job_paths(configs[-1], tracking=True)
        e = (cfg or configs[-1]).eval
        given = {"seconds": args.seconds, "limit": args.limit}
        e = dataclasses.replace(e, **{k: v for k, v in given.items() if v is not None})  # re-validated
        set_dir = resolve_path(args.evalset) if args.evalset else Path(e.set_dir)
        e = dataclasses.replace(e, **{k: resolve_path_or_id(getattr(e, k)) for k in ("clap", "passt", "vggish")})
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            return fail(PROG, "--device cuda was given but no CUDA device is available here")
        overrides = {
            k: getattr(args, k) for k in ("cfg_scale", "batch_size", "compile") if getattr(args, k) is not None
        }
        if cfg is not None:  # the codec too: a checkpoint moved from another machine names a path there
            overrides["codec"] = cfg.preprocess.codec
        check_weights(e)  # fails here, naming the setting, when CLAP / PaSST / VGGish weights are missing
        for c in configs:
            codec_file(overrides.get("codec") or c.preprocess.codec, "preprocess.codec")
        uri = resolve_tracking_uri(cfg) if cfg else None  # None: each checkpoint's config (and $MLFLOW_TRACKING_URI)
        if uri:
            check_store_exists(uri)  # the store --config names: where the training runs should be
        else:
            for store in sorted({resolve_tracking_uri(c) for c in configs}):
                try:
                    check_store_exists(store)
                except FileNotFoundError:  # trained on another machine: evaluate anyway, log when the store is given
                    print(
                        f"note: no MLflow store at {store}, where the checkpoints were trained: metrics.json only; to "
                        "log to the training run, pass --config with mlflow.tracking_uri (a later --run logs such "
                        "steps)",
                        file=sys.stderr,
                    )
        evaluator = CheckpointEvaluator(e, set_dir, overrides, device, uri)
        for c in configs:
            evaluator.generation(c)  # --cfg and --batch-size checked against each checkpoint's settings
        if args.checkpoint and not args.out:  # the step's own evaluation: as --run does it, for one step
            run_dir = run_folder(checkpoints[0], configs[0])
            plan = plan_run(
                evaluator, run_dir, force=args.force, checkpoints={saved_step(checkpoints[0]): checkpoints[0]}
            )
            if args.force:  # its step again, whatever its record says (nothing left to skip or to log as it was)
                plan.todo, plan.done, plan.unlogged, plan.unrecorded = dict(plan.checkpoints), [], [], []
        elif args.run:
            run_dir = target
            plan = plan_run(evaluator, target, force=args.force, checkpoints=found)
    except (ConfigError, MissingWeightsError, FileNotFoundError, ValueError) as err:
        return fail(PROG, err)

    ensure_ray()
    try:
        check_cluster(e, device)
    except ValueError as err:
        return fail(PROG, err)
    n = len(evaluator.evalset)
    print(f"evaluating on {n} captions of {set_dir} ({e.seconds:g} s each, FAD on {e.fad_embedder}); on {device}")
    if args.out:
        ev = evaluator(checkpoints[0], resolve_path(args.out), to_run=False)
        print(format_metrics(ev))
        print(f"step {ev.step}: {ev.out_dir / 'metrics.json'} (a side evaluation: not logged to the training run)")
        return 0
    if plan.done:
        print(f"already evaluated with these settings: steps {', '.join(map(str, plan.done))}")
    if plan.unrecorded:
        print(
            f"note: steps {', '.join(map(str, plan.unrecorded))} were evaluated by an earlier version, which did "
            "not record its settings: kept as they are (--force evaluates them again)"
        )
    if plan.changed and args.force:
        print(f"evaluating again (--force): steps {', '.join(map(str, plan.changed))}")
    evaluations, _ = evaluate_run(evaluator, run_dir, plan=plan)
    if not evaluations:
        print("nothing new to evaluate" + (" (--force evaluates again)" if args.checkpoint else ""))
    for ev in evaluations:
        where = f"MLflow run {ev.run_id}" if ev.run_id else "no MLflow training run found for it"
        print(f"step {ev.step}: {ev.out_dir / 'metrics.json'} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
