"""Evaluate checkpoints on the eval set: generate, score (FAD, KLD, CLAP), write metrics.json, log to MLflow.

For each checkpoint (`CheckpointEvaluator`):
1. generation: `eval.generators` Ray tasks (one GPU each on cuda) generate `eval.seconds` per caption of the eval
   set (its first `eval.limit`), from the T5 features stored with it, with the checkpoint's sampling settings;
2. scoring: a Ray Data actor pool of `ClipScorer`s (`eval.actors`, `eval.gpus_per_actor` each) turns the clips into
   evidence; the references' evidence is computed once and reused for every checkpoint of a call;
3. outputs: `<run>/eval/step_NNNNNN/` gets the generated WAVs (spectrograms of the first few); the training run
   the checkpoint came from gets `eval/fad`, `eval/kld`, `eval/kld_reverse` and `eval/clap` at the checkpoint's
   optimizer step, with metrics.json and the first clips as artifacts; `metrics.json` is written last, once the
   numbers are in MLflow.
A step's `metrics.json` records the settings its numbers depend on (`evaluation_settings`); eval/runs.py decides
from it which steps of a run to evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from configs.schema import EvalConfig, ExperimentConfig, GenerationConfig
from eval.plots import spectrogram_png
from eval.scoring import Evidence, evidence_on_ray, set_metrics
from pipelines.generation import slugify
from pipelines.paths import check_store_exists, resolve_path_or_id
from pipelines.preprocess.evalset import EvalSet, read_evalset

EVAL_DIR = "eval"  # in a run folder: one step_NNNNNN/ per evaluated checkpoint
METRICS_FILE = "metrics.json"
N_EXAMPLES = 4  # clips per checkpoint with a spectrogram, logged to MLflow
PROGRESS_SECONDS = 30.0  # generation's progress lines, at most this often
MAX_CLIPS_PER_PASS = 2048  # generated clips held at once (10 s at 44.1 kHz: 3.6 GB in the object store)
EVAL_CHECKPOINT_DIR = "eval_checkpoints"  # weights-only checkpoints kept for evaluation (train.eval_checkpoint_every)
SAMPLING_KEYS = ("seconds", "top_k", "top_p", "temperature", "cfg_scale", "seed", "batch_size")  # in metrics.json
# The sampling settings two evaluations must share to be comparable: the distribution sampled from. The seed, the
# batch split (which seeds each caption gets) and the decoding path only change which sample is drawn.
DISTRIBUTION_KEYS = ("top_k", "top_p", "temperature", "cfg_scale")


@dataclass
class Evaluation:
    step: int
    checkpoint: Path
    metrics: dict[str, float]
    out_dir: Path
    run_id: str | None
    seconds: dict[str, float]


def artifact_dir(step: int) -> str:
    """Where a step's metrics.json and example clips go among its training run's MLflow artifacts."""
    return f"eval/step_{step:06d}"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step_{step:06d}"


def run_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Every saved model of a run folder by optimizer step (Ray Train's checkpoints, local-mode ones, the
    weights-only evaluation ones), newest file per step; `best/` (a copy of some step) and hidden folders skipped.

    Raises:
        FileNotFoundError when `run_dir` does not exist.
        ValueError when its checkpoints belong to several runs (a storage folder, a sweep's folder), listing them.
    """
    from pipelines.train.checkpoints import BEST_DIR, MODEL_FILE, check_one_run, saved_step

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    files = []
    for file in sorted(run_dir.rglob(MODEL_FILE), key=lambda f: f.stat().st_mtime):
        parts = file.relative_to(run_dir).parts
        if not (any(p.startswith(".") for p in parts) or BEST_DIR in parts[:-1] or parts[0] == EVAL_DIR):
            files.append(file)
    check_one_run(run_dir, files, "pass one run folder to --run")
    return dict(sorted({saved_step(file): file for file in files}.items()))  # oldest first: the newest file per step


def _generate_shard(
    checkpoint: str, set_dir: str, limit: int | None, rows: list[int], overrides: dict, device: str, batch: int
) -> Iterator[np.ndarray]:
    """Ray generator task: clips for eval-set rows `rows` from one checkpoint, yielded `batch` captions at a time
    ((B, T) float32), so the driver sees progress. Batch b of the whole set is sampled with seed `seed + b` however
    the rows are sharded (shards start at multiples of `batch`)."""
    from modeling.pretrained.codec import load_codec
    from pipelines.generation import generate_from_features, sampling_options
    from pipelines.train.checkpoints import load_model

    model, cfg, _ = load_model(checkpoint, device=device)
    evalset = read_evalset(set_dir, limit)
    codec = load_codec(overrides.pop("codec", None) or cfg.preprocess.codec, device=device, setting="preprocess.codec")
    if int(codec.sample_rate) != evalset.sample_rate:
        raise ValueError(
            f"the codec decodes at {codec.sample_rate} Hz but the eval set's references are at {evalset.sample_rate} "
            "Hz: generations and references must be compared at one rate (write the eval set with this codec)"
        )
    options = sampling_options(dataclasses.replace(cfg.generation, **overrides), cfg.data.frame_rate)
    options["batch_size"] = batch
    seed = options.pop("seed")
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        samples = generate_from_features(
            model, [evalset.captions[i] for i in part], lambda r, part=part: evalset.text_batch([part[i] for i in r]),
            codec=codec, device=device, seed=seed + part[0] // batch, **options,
        )  # fmt: skip
        yield np.stack([s.audio for s in samples]).astype(np.float32)


def gather_generated(jobs: list[list], log=print, every: float = PROGRESS_SECONDS) -> list[np.ndarray]:
    """The clips of each checkpoint's generator tasks (`launch_generation`), (n, T) per checkpoint in row order,
    collected as batches arrive, with a line of progress at most every `every` seconds and at the end."""
    import ray

    parts: list[list[list[np.ndarray]]] = [[[] for _ in shards] for shards in jobs]
    pending = {gen: (j, k) for j, shards in enumerate(jobs) for k, gen in enumerate(shards)}
    total = sum(len(shards) for shards in jobs)  # (clip counts are known only as they arrive)
    t0 = last = time.perf_counter()
    clips = finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for gen in ready:
            j, k = pending[gen]
            try:
                batch = ray.get(next(gen))
            except StopIteration:
                del pending[gen]
                finished += 1
                continue
            parts[j][k].append(batch)
            clips += len(batch)
        now = time.perf_counter()
        if now - last >= every or not pending:
            log(f"  {clips} clips generated, {finished}/{total} task(s) done ({now - t0:.0f} s)")
            last = now
    return [np.concatenate([b for shard in shards for b in shard]) for shards in parts]


def launch_generation(
    checkpoint: Path, batch: int, n: int, e: EvalConfig, set_dir: Path, overrides: dict, device: str
) -> list:
    """Start `e.generators` Ray generator tasks that generate one clip per caption of the first `n` eval-set rows,
    `batch` captions at a time. Returns their generators (`gather_generated` collects them: (n, T) float32 at the
    eval set's rate)."""
    import ray

    per_shard = -(-n // e.generators)
    per_shard = -(-per_shard // batch) * batch  # shards aligned to batches: the seeds do not depend on sharding
    shards = [list(range(s, min(s + per_shard, n))) for s in range(0, n, per_shard)]
    if device == "cuda":
        resources = {"num_gpus": 1, "num_cpus": 1}
    else:  # torch in a Ray task uses as many threads as the task has CPUs
        resources = {"num_cpus": max(1, int(ray.cluster_resources().get("CPU", 1)) // len(shards))}
    task = ray.remote(_generate_shard).options(**resources)
    return [
        task.remote(str(checkpoint), str(set_dir), e.limit, rows, dict(overrides), device, batch) for rows in shards
    ]


def write_outputs(out_dir: Path, evalset: EvalSet, audio: np.ndarray, sample_rate: int, n_examples: int) -> list[Path]:
    """Each clip as `NNNN_<caption slug>.wav` (16-bit), spectrograms of the first `n_examples`, in `out_dir/clips`
    (emptied first: an earlier evaluation's clips are not mixed in). Returns the example files (WAV and PNG)."""
    clips = out_dir / "clips"
    if clips.is_dir():
        shutil.rmtree(clips)
    clips.mkdir(parents=True)
    examples = []
    for i, (caption, clip) in enumerate(zip(evalset.captions, audio, strict=True)):
        stem = f"{i:04d}_{slugify(caption)}"
        clip = np.nan_to_num(clip)
        peak = float(np.abs(clip).max()) if clip.size else 0.0
        sf.write(clips / f"{stem}.wav", clip / peak if peak > 1 else clip, sample_rate, subtype="PCM_16")
        if i < n_examples:
            examples += [clips / f"{stem}.wav", spectrogram_png(clip, sample_rate, clips / f"{stem}.png", caption)]
    return examples


def find_training_run(cfg: ExperimentConfig, uri: str) -> str | None:
    """The MLflow run that trained `cfg` (the newest with its name and run folder, as the training driver tags it)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.tracking import find_run

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    found = find_run(client, exp.experiment_id, cfg.name, cfg.run_dir)
    return found.info.run_id if found else None


def sampling_settings(generation: GenerationConfig) -> dict:
    """The sampling settings of a generation config that metrics.json records."""
    return {k: getattr(generation, k) for k in SAMPLING_KEYS}


def _model_id(value: str | None) -> str | None:
    return resolve_path_or_id(value) if value else value


def evaluation_settings(e: EvalConfig, set_dir: str | Path, clips: int, generation: GenerationConfig) -> dict:
    """What an evaluation's numbers depend on besides the checkpoint: which references (the eval set's folder and
    how many of its captions), how long a clip is compared, the scoring models and the sampling distribution.
    metrics.json keeps it as `settings`; a step is evaluated again only when these differ (`configs.changes`)."""
    models = {"clap": _model_id(e.clap), "passt": _model_id(e.passt)}
    if e.fad_embedder == "vggish":
        models["vggish"] = _model_id(e.vggish)
    return {
        "eval_set": str(Path(set_dir).resolve()),
        "clips": clips,
        "seconds_per_clip": e.seconds,
        "fad_embedder": e.fad_embedder,
        "models": models,
        "sampling": {k: getattr(generation, k) for k in DISTRIBUTION_KEYS},
    }


def check_evalset(e: EvalConfig, evalset: EvalSet, set_dir: str | Path) -> None:
    """Refuse, before anything is generated, settings this eval set cannot be scored with."""
    length = evalset.audio.shape[1]
    if int(round(e.seconds * evalset.sample_rate)) > length:
        raise ValueError(
            f"eval.seconds={e.seconds:g} (--seconds) is longer than the reference clips of {set_dir} "
            f"({length / evalset.sample_rate:g} s): generations are compared with references of that length; "
            "evaluate at most that long, or write the eval set with longer clips"
        )
    if e.fad_embedder == "clap" and len(evalset) < 2:
        raise ValueError(
            f"FAD on CLAP embeddings (eval.fad_embedder=clap, one per clip) needs at least 2 clips, and {len(evalset)} "
            "caption(s) are evaluated: raise eval.limit (--limit), or set eval.fad_embedder=vggish"
        )


def check_cluster(e: EvalConfig, device: str) -> None:
    """Refuse settings the connected Ray cluster cannot schedule (the tasks would wait forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and gpus < 1:
        raise ValueError("generation on cuda needs a GPU in the Ray cluster, which has none; use --device cpu")
    if e.gpus_per_actor > gpus:
        raise ValueError(
            f"eval.gpus_per_actor={e.gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs: "
            "set eval.gpus_per_actor=0 to score on CPUs"
        )


class CheckpointEvaluator:
    """Evaluates checkpoints of models trained on one eval set, keeping the references' evidence between them.

    Args:
        e: the `eval` section (models, seconds, limit, batch size, actors).
        set_dir: the eval set (`simba-ttm make-evalset`).
        overrides: generation settings over each checkpoint's own (`seconds` is `e.seconds`), plus `codec`.
        device: where generation runs ("cuda": one GPU per generation task).
        tracking_uri: the MLflow store of the training runs (None: each checkpoint's own config decides).
    """

    def __init__(self, e: EvalConfig, set_dir: Path, overrides: dict, device: str, tracking_uri: str | None = None):
        self.e, self.set_dir, self.device, self.uri = e, Path(set_dir), device, tracking_uri
        self.overrides = {"seconds": e.seconds, **overrides}
        self.evalset = read_evalset(self.set_dir, e.limit)
        check_evalset(e, self.evalset, self.set_dir)
        self.references: Evidence | None = None

    def generation(self, cfg: ExperimentConfig) -> GenerationConfig:
        """A checkpoint's generation settings with this evaluation's overrides (validated: ConfigError)."""
        return dataclasses.replace(cfg.generation, **{k: v for k, v in self.overrides.items() if k != "codec"})

    def settings(self, cfg: ExperimentConfig) -> dict:
        """`evaluation_settings` of a checkpoint whose config is `cfg`."""
        return evaluation_settings(self.e, self.set_dir, len(self.evalset), self.generation(cfg))

    def training_run(self, cfg: ExperimentConfig) -> tuple[str | None, str]:
        """(the id of the MLflow run that trained `cfg` or None, the store's URI). A SQLite store that does not exist
        here (a checkpoint trained on another machine) finds none, and is not created."""
        uri = self.uri or self._uri(cfg)
        try:
            check_store_exists(uri)
        except FileNotFoundError:
            return None, uri
        return find_training_run(cfg, uri), uri

    def __call__(self, checkpoint: Path, out_dir: Path | None = None, to_run: bool = True) -> Evaluation:
        return self.evaluate([(Path(checkpoint), out_dir)], to_run=to_run)[0]

    def evaluate(self, checkpoints: list[tuple[Path, Path | None]], log=print, to_run: bool = True) -> list[Evaluation]:
        """Evaluate (checkpoint, output folder or None for `<run>/eval/step_NNNNNN`) pairs, logging to each one's
        training run unless `to_run` is False: a side evaluation (`evaluate --checkpoint ... --out DIR`) must not
        change what MLflow holds at the step, of which the step folder's metrics.json is the record
        (`eval.runs.plan_run`). Checkpoints are taken in passes of at most MAX_CLIPS_PER_PASS clips: a pass
        generates for all its checkpoints at once (Ray runs the tasks side by side) and scores all their clips in
        one actor pool (the models load once per pass)."""
        per_pass = max(1, MAX_CLIPS_PER_PASS // max(len(self.evalset), 1))
        done = []
        for start in range(0, len(checkpoints), per_pass):
            done += self._pass(checkpoints[start : start + per_pass], log, to_run)
        return done

    def _pass(self, checkpoints: list[tuple[Path, Path | None]], log, to_run: bool) -> list[Evaluation]:
        from pipelines.train.checkpoints import run_folder, saved_config, saved_step

        t0 = time.perf_counter()
        n, sr = len(self.evalset), self.evalset.sample_rate
        jobs = []
        for file, out in checkpoints:
            step, cfg = saved_step(file), saved_config(file)
            generation = self.generation(cfg)
            refs = launch_generation(file, generation.batch_size, n, self.e, self.set_dir, self.overrides, self.device)
            out = Path(out) if out is not None else step_dir(run_folder(file, cfg), step)
            jobs.append((Path(file), out, step, cfg, generation, refs))
        log(f"generating {n} clips for each of {len(jobs)} checkpoint(s) (steps {', '.join(str(j[2]) for j in jobs)})")
        audio = gather_generated([refs for *_, refs in jobs], log)
        seconds = {"generate": time.perf_counter() - t0}

        t0 = time.perf_counter()
        sets = audio if self.references is not None else [*audio, self.evalset.audio]
        log(f"scoring {len(sets) * n} clips ({'with' if len(sets) > len(audio) else 'without'} the references)")
        evidence = evidence_on_ray(
            self.e, sets, sr, self.evalset.captions, actors=self.e.actors, gpus_per_actor=self.e.gpus_per_actor
        )
        if self.references is None:
            self.references = evidence.pop()
        seconds["score"] = time.perf_counter() - t0
        seconds = {f"{k} (this pass of {len(jobs)} checkpoints)": v for k, v in seconds.items()}

        results = []
        for (file, out, step, cfg, generation, _), clips, ev in zip(jobs, audio, evidence, strict=True):
            metrics = set_metrics(ev, self.references)
            run_id, uri = self.training_run(cfg) if to_run else (None, "")
            logger = None
            if run_id is not None:
                from pipelines.train.tracking import RunLogger

                logger = RunLogger(run_id, uri)
            info = {
                "checkpoint": str(file),
                "mlflow_run_id": run_id,
                "eval_set": str(self.set_dir),
                "settings": evaluation_settings(self.e, self.set_dir, n, generation),
            }
            record(out, step, cfg, self.e, self.evalset, clips, metrics, seconds, logger, generation, info)
            results.append(Evaluation(step, file, metrics, out, run_id, seconds))
        return results

    @staticmethod
    def _uri(cfg: ExperimentConfig) -> str:
        from pipelines.train.tracking import resolve_tracking_uri

        return resolve_tracking_uri(cfg)


def record(
    out_dir: Path,
    step: int,
    cfg: ExperimentConfig,
    e: EvalConfig,
    evalset: EvalSet,
    audio: np.ndarray,
    metrics: dict[str, float],
    seconds: dict[str, float],
    logger,
    generation: GenerationConfig,
    info: dict,
) -> None:
    """Write the clips into `out_dir`, log the metrics at `step` and the first clips to `logger`'s run (a
    `RunLogger`, or None), then write metrics.json (its presence marks the step as done) and log it too. An
    existing metrics.json (an evaluation with other settings) is first renamed `metrics.replaced-<UTC time>.json`,
    so that a crash on the way leaves the step to do again."""
    previous = Path(out_dir) / METRICS_FILE
    if previous.is_file():
        previous.rename(previous.with_name(f"metrics.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"))
    examples = write_outputs(out_dir, evalset, audio, evalset.sample_rate, N_EXAMPLES)
    summary = {
        "step": step,
        "arch": cfg.model.arch,
        "run": cfg.name,
        "metrics": metrics,
        "clips": len(audio),
        "seconds_per_clip": e.seconds,
        "fad_embedder": e.fad_embedder,
        "models": {"clap": e.clap, "passt": e.passt, "vggish": e.vggish},
        "generation": sampling_settings(generation),
        "wall_seconds": {k: round(v, 2) for k, v in seconds.items()},
        **info,
    }
    if logger is not None:
        logger.metrics(metrics, step=step)
        for file in examples:
            logger.artifact(file, artifact_dir(step))
    write_metrics(out_dir, summary, logger)


def write_metrics(out_dir: Path, summary: dict, logger) -> None:
    """`summary` as out_dir/metrics.json (replaced whole), also logged to `logger`'s run when given. The file
    appears only once it is logged: a crash before leaves the step to do again."""
    final = Path(out_dir) / METRICS_FILE
    pending = Path(out_dir) / ".pending"  # hidden: never taken for a step's outputs
    pending.mkdir(parents=True, exist_ok=True)
    staged = pending / METRICS_FILE
    staged.write_text(json.dumps(summary, indent=2) + "\n")
    if logger is not None:
        logger.artifact(staged, artifact_dir(summary["step"]))
    staged.replace(final)
    pending.rmdir()


def log_recorded(out_dir: Path, logger) -> dict:
    """Log a step evaluated while no training run was found (its metrics.json says `mlflow_run_id: null`) to
    `logger`'s run now: the metrics at its step, the example clips and metrics.json, which then names the run."""
    summary = json.loads((Path(out_dir) / METRICS_FILE).read_text())
    step = summary["step"]
    logger.metrics(summary["metrics"], step=step)
    for png in sorted((Path(out_dir) / "clips").glob("*.png")):  # the examples: the clips with a spectrogram
        for file in (png.with_suffix(".wav"), png):
            logger.artifact(file, artifact_dir(step))
    write_metrics(out_dir, {**summary, "mlflow_run_id": logger.run_id}, logger)
    return summary


class PeriodicEvaluator:
    """Training's own evaluation (`train.eval_every`), on rank 0, in-process: the model being trained generates
    for the first `eval.limit` captions, one `ClipScorer` scores them; results go where `simba-ttm evaluate`
    puts them (`<run>/eval/step_NNNNNN/`, the run's eval/* metrics), so `evaluate --run` skips those steps."""

    def __init__(self, cfg: ExperimentConfig, device, run_dir: Path | None):
        from eval.scoring import ClipScorer
        from modeling.pretrained.codec import load_codec

        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.evalset = read_evalset(cfg.eval.set_dir, cfg.eval.limit)
        check_evalset(cfg.eval, self.evalset, cfg.eval.set_dir)
        self.codec = load_codec(cfg.preprocess.codec, device=device, setting="preprocess.codec")
        self.scorer = ClipScorer(cfg.eval, str(device))
        self.references: Evidence | None = None

    def __call__(self, model, step: int, logger) -> dict[str, float]:
        from eval.scoring import evidence_in_process
        from pipelines.generation import generate_from_features, sampling_options

        e, sr = self.cfg.eval, self.evalset.sample_rate
        generation = dataclasses.replace(self.cfg.generation, seconds=e.seconds)
        t0 = time.perf_counter()
        samples = generate_from_features(
            model, self.evalset.captions, self.evalset.text_batch, codec=self.codec, device=self.device,
            **sampling_options(generation, self.cfg.data.frame_rate),
        )  # fmt: skip
        audio = np.stack([s.audio for s in samples])
        seconds = {"generate": time.perf_counter() - t0}
        t0 = time.perf_counter()
        if self.references is None:
            captions, bs = self.evalset.captions, e.batch_size
            self.references = evidence_in_process(self.scorer, self.evalset.audio, sr, captions, batch_size=bs)
        generated = evidence_in_process(self.scorer, audio, sr, self.evalset.captions, batch_size=e.batch_size)
        metrics = set_metrics(generated, self.references)
        seconds["score"] = time.perf_counter() - t0
        if self.run_dir is not None:
            info = {
                "checkpoint": None,
                "during_training": True,
                "mlflow_run_id": logger.run_id if logger is not None else None,
                "eval_set": self.cfg.eval.set_dir,
                "settings": evaluation_settings(e, e.set_dir, len(self.evalset), generation),
            }
            out = step_dir(self.run_dir, step)
            record(out, step, self.cfg, e, self.evalset, audio, metrics, seconds, logger, generation, info)
        elif logger is not None:
            logger.metrics(metrics, step=step)
        return metrics


def format_metrics(ev: Evaluation) -> str:
    m = ev.metrics
    return (
        f"step {ev.step}: FAD {m['eval/fad']:.4f}  KLD {m['eval/kld']:.4f} (reverse {m['eval/kld_reverse']:.4f})  "
        f"CLAP {m['eval/clap']:.4f} (references: {m['eval/clap_reference']:.4f})"
    )
