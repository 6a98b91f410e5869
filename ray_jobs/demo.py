"""`make demo` / `simba-ttm demo`: the whole system end to end on a 2-core CPU in minutes.

Generated corpus (Jamendo layout, with bad inputs) -> preprocess (Ray Data) -> train Prefix SiMBA and the
Cross Transformer at debug scale, side by side (Ray Train, MLflow) -> generate a few clips from each -> the eval
set from the corpus's held-out (Song Describer) tracks -> evaluate every checkpoint of both runs -> Fig. 3 and
Fig. 1 -> where to look. `--timings FILE` writes the wall time of each stage (`bench/demo.py` reads it).
Pretrained parts come from configs/debug.yaml; the tiny random ones are created there when absent (their FAD,
KLD and CLAP are noise: the numbers test the pipeline, not the models). Clips are captioned from the corpus's
per-clip caption file, as the paper captions each clip (`preprocess.captions=...` on the command line picks
another captioner).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

from configs import ConfigError, load_config
from pipelines.paths import (
    PREPROCESS_PATHS,
    TRAIN_PATHS,
    absolute_paths,
    check_job_paths,
    check_output_folder,
    resolve_path,
)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


class Stages:
    """Wall time of each stage of the demo, printed as a breakdown at the end (`bench/demo.py` reads it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def table(self) -> str:
        total = self.total()
        rows = [f"  {name:<34} {value:7.1f} s  {100 * value / total:5.1f}%" for name, value in self.seconds.items()]
        rest = total - sum(v for k, v in self.seconds.items() if "/" not in k)  # "a/b" rows are parts of "a"
        rows.append(f"  {'other (imports, printing)':<34} {rest:7.1f} s  {100 * rest / total:5.1f}%")
        return "\n".join([*rows, f"  {'total':<34} {total:7.1f} s"])


def _train_side_by_side(configs: dict, stages: Stages) -> dict:
    """Both trainings at once, each a TorchTrainer on the same Ray runtime: their steps are seconds, the rest is
    Ray Train starting and stopping a worker group, which overlaps. Returns {arch: TrainingOutcome}."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.train.driver import run_training
    from pipelines.train.tracking import experiment_id, resolve_tracking_uri

    first = next(iter(configs.values()))
    experiment_id(first, resolve_tracking_uri(first))  # create the MLflow store once, before two threads use it

    def train(arch: str):
        t0 = time.perf_counter()
        out = run_training(configs[arch])
        _training_parts(stages, arch, time.perf_counter() - t0, out.result.metrics)
        return out

    with ThreadPoolExecutor(len(configs)) as pool:
        futures = {arch: pool.submit(train, arch) for arch in configs}
        return {arch: future.result() for arch, future in futures.items()}


def _training_parts(stages: Stages, arch: str, wall: float, metrics: dict) -> None:
    """Split a training by what its worker reported: setup, optimizer steps, validation, ... and the rest (the
    driver's MLflow run, Ray Train starting and stopping the worker group)."""
    inside = 0.0
    for key, value in metrics.items():
        if key.startswith("seconds_"):
            stages.seconds[f"train (both at once)/{arch}: {key.removeprefix('seconds_')}"] = value
            inside += value
    stages.seconds[f"train (both at once)/{arch}: Ray Train + MLflow, outside the loop"] = wall - inside
    stages.seconds[f"train (both at once)/{arch}: wall"] = wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm demo", description=__doc__)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--tracks", type=int, default=15, help="tracks in the generated corpus")
    parser.add_argument(
        "--sdd-tracks", type=int, default=4, help="of which held out as the eval set's (Song Describer)"
    )
    parser.add_argument("--out", default="outputs/demo", help="where generated audio goes")
    parser.add_argument("--timings", metavar="FILE", help="also write the stage breakdown to FILE as JSON")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    stages = Stages()
    try:
        cfg = load_config(args.config, args.overrides)
        # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
        outputs = {"--out": args.out, "--timings": args.timings}
        check_job_paths(cfg, (*PREPROCESS_PATHS, *TRAIN_PATHS), tracking=True, args=outputs)
        check_output_folder("--out", args.out)
        cfg, out_dir = absolute_paths(cfg), resolve_path(args.out)  # against $SIMBA_TTM_ROOT when set
    except (ConfigError, FileNotFoundError) as err:
        print(f"simba-ttm demo: {err}", file=sys.stderr)
        return 2

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch, Ray and MLflow takes.
    from modeling.pretrained.tiny import make_tiny_pretrained
    from pipelines.preprocess.corpus.writer import CAPTIONS_NAME, make_corpus
    from pipelines.preprocess.graph import run_preprocess
    from pipelines.runtime import ensure_ray

    p = cfg.preprocess
    corpus_root = Path(p.metadata_tsv).parent
    _banner(f"1/7 corpus: {args.tracks} synthesized tracks + one of each bad input in {corpus_root}")
    with stages("corpus"):
        if not Path(p.metadata_tsv).is_file():
            make_corpus(corpus_root, args.tracks, bad=True, seed=0, min_seconds=31, max_seconds=70, progress=False,
                        sdd_tracks=args.sdd_tracks)  # fmt: skip
        else:
            print("already there (delete it to make a new one)")

    missing = [k for k in ("separator", "codec", "text_encoder") if not resolve_path(getattr(p, k)).exists()]
    tiny_dir = resolve_path("data/demo/pretrained")
    if missing and all(resolve_path(getattr(p, k)).parent == tiny_dir for k in missing):
        with stages("tiny pretrained models"):
            made = make_tiny_pretrained(tiny_dir)
        cfg = absolute_paths(cfg)  # the model settings name files now
        p = cfg.preprocess
        print(f"NOTE: no real weights configured for {', '.join(missing)}: using TINY RANDOM models ({made}).")
        print("      The pipeline and training are real; the audio will not sound like music.")

    caption_file = corpus_root / CAPTIONS_NAME
    chosen = any(o.split("=", 1)[0].strip().startswith("preprocess.caption") for o in args.overrides)
    if not chosen and caption_file.is_file():  # per-clip captions, as the paper's (keyed by track and clip start)
        cfg = dataclasses.replace(
            cfg, preprocess=dataclasses.replace(p, captions="file", caption_file=str(caption_file))
        )
        p = cfg.preprocess
    print(f"captions: {p.captions}" + (f" ({p.caption_file})" if p.captions == "file" else ""))

    with stages("Ray start"):
        ensure_ray()
    _banner("2/7 preprocess (Ray Data): decode, clip, vocal removal, silence rule, captions, DAC, Flan-T5")
    with stages("preprocess"):
        summary = run_preprocess(cfg)
    print(summary.table())

    _banner("3/7 train Prefix SiMBA and the Cross Transformer at debug scale, side by side (Ray Train + MLflow)")
    configs = {
        arch: load_config(args.config, [*args.overrides, f"model.arch={arch}", f"name=demo-{arch}"])
        for arch in ("simba", "transformer")
    }
    with stages("train (both at once)"):
        results = _train_side_by_side(configs, stages)
    for arch, out in results.items():
        shown = {k: round(v, 4) for k, v in out.result.metrics.items() if not k.startswith("seconds_")}
        print(f"{arch}: final metrics {shown}")

    _banner("4/7 generate")
    with stages("generate"):
        _generate(results, cfg, out_dir)

    _banner("5/7 eval set (Ray Data): the held-out Song Describer tracks' captions, T5 features, references, DAC codes")
    with stages("eval set"):
        code, cfg = _make_evalset(cfg, args)
    if code:
        return code
    _banner("6/7 evaluate every checkpoint of both runs: FAD, KLD, CLAP (generation tasks + a scorer actor pool)")
    with stages("evaluate"):
        _evaluate(results, cfg)
    _banner("7/7 the paper's figures: Fig. 3 (metrics over steps, both runs) and Fig. 1 (DAC codebooks)")
    with stages("figures"):
        code = _figures(results, args, out_dir)
    if code:
        return code

    _banner(f"done in {stages.total():.0f} s")
    print(stages.table())
    if args.timings:
        resolve_path(args.timings).write_text(json.dumps({"total": stages.total(), **stages.seconds}, indent=1))
    uri = results["simba"].tracking_uri
    print(f"tokens:      {cfg.data.tokens_dir}")
    print(f"rejects:     {p.rejects_dir}")
    print(f"checkpoints: {cfg.train.storage_path}")
    print(f"audio:       {out_dir}")
    evaluated = [o.config.run_dir / "eval" for o in results.values()]
    print(f"evaluation:  {', '.join(map(str, evaluated))}")
    print(f"figures:     {out_dir / 'figure3' / 'figure3.png'}, {out_dir / 'codebooks' / 'codebooks.png'}")
    print(f"MLflow runs: {', '.join(o.run_id for o in results.values())}")
    print(f"browse them: .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    return 0


def _make_evalset(cfg, args):
    """The eval set from the corpus's Song Describer CSV (kept when already there), and the tiny CLAP and PaSST
    when debug.yaml's are missing. Returns (exit code, 0 to go on; the config with the models' paths)."""
    from eval.tiny import make_tiny_eval_models
    from ray_jobs import make_evalset

    e = cfg.eval
    tiny_dir = resolve_path("data/demo/pretrained")
    missing = [k for k in ("clap", "passt") if not resolve_path(getattr(e, k)).exists()]
    if missing and all(resolve_path(getattr(e, k)).parent == tiny_dir for k in missing):
        made = make_tiny_eval_models(tiny_dir)
        cfg = absolute_paths(cfg)  # the model settings name files now
        print(f"NOTE: no real {' / '.join(missing)} configured: using TINY RANDOM ones ({made}).")
        print("      FAD, KLD and CLAP below are noise: they show the pipeline works, not how good the models are.")
    if any(Path(cfg.eval.set_dir).glob("part-*.parquet")):
        print(f"{cfg.eval.set_dir}: already there (delete it to make a new one)")
        return 0, cfg
    return make_evalset.main(["--config", args.config, *args.overrides]), cfg


def _evaluate(results: dict, cfg) -> None:
    """Every checkpoint of both runs in one pass: their generation tasks side by side, one scorer pool for all."""
    from eval.evaluate import CheckpointEvaluator, check_cluster, format_metrics, run_checkpoints, step_dir

    check_cluster(cfg.eval, "cpu")
    evaluator = CheckpointEvaluator(cfg.eval, Path(cfg.eval.set_dir), {}, "cpu")
    todo, archs = [], []
    for arch, out in results.items():
        run_dir = out.config.run_dir
        for step, file in run_checkpoints(run_dir).items():
            todo.append((file, step_dir(run_dir, step)))
            archs.append(arch)
    for arch, ev in zip(archs, evaluator.evaluate(todo), strict=True):
        print(f"{arch:<12} {format_metrics(ev)}")


def _figures(results: dict, args, out_dir: Path) -> int:
    from ray_jobs import codebooks, figure3

    runs = [o.run_id for o in results.values()]
    code = figure3.main(["--runs", *runs, "--config", args.config, "--out", str(out_dir / "figure3")])
    return code or codebooks.main(["--config", args.config, *args.overrides, "--out", str(out_dir / "codebooks")])


def _generate(results: dict, cfg, out_dir: Path) -> None:
    """Two prompts from each trained model's last checkpoint -> WAV + PNG in out_dir/<arch>/."""
    from modeling.pretrained.codec import load_codec
    from modeling.pretrained.text_encoder import TextEncoder
    from pipelines.generation import generate_audio, sampling_options, write_samples
    from pipelines.train.checkpoints import load_model

    p = cfg.preprocess
    text_encoder = TextEncoder(p.text_encoder, setting="preprocess.text_encoder")
    codec = load_codec(p.codec, setting="preprocess.codec")
    prompts = list(cfg.generation.prompts)[:2]
    for arch, out in results.items():
        model, mcfg, step = load_model(out.checkpoint)
        options = sampling_options(mcfg.generation, mcfg.data.frame_rate)
        samples = generate_audio(model, prompts, text_encoder=text_encoder, codec=codec, **options)
        for s in write_samples(samples, out_dir / arch, prefix=arch):
            print(f"{arch} (step {step}): {s.caption!r} -> {s.wav}")


if __name__ == "__main__":
    sys.exit(main())
