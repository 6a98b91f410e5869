"""Preprocessing throughput: per-stage rates, a projection to the full MTG-Jamendo, and decode scaling 1 vs 2 workers.

1. Rates (`--no-rates` skips them). Each stage of `pipelines/preprocess/graph.py`, in this process, on the
   generated corpus, reported as seconds of compute per minute of audio the stage works on:
   - decode: `decode_step` (libsndfile decode, channels kept, soxr HQ resample to 44.1 kHz, 30 s clips, the
     first clip in the seeded order shipped), CPU seconds per minute of source audio, per kind of file;
   - separation: `remove_vocals` (HTDemucs, no shifts) on 30 s stereo clips, per minute of clip audio;
   - codec: DAC `encode_codes` of a 30 s mono clip, per minute of clip audio;
   - text: the Flan-T5 encoder on a batch of captions, per caption, and per minute of kept clip audio (one
     caption per 30 s clip).
   The models are the ones given by --separator / --codec / --text-encoder (a path or id, as in the config), on
   --device; by default tiny random ones (modeling/pretrained/tiny.py) on the CPU, whose rates say nothing about
   the real models. On the CPU torch runs on one thread, as in a 1-CPU actor, so wall seconds are CPU seconds.
   Each model runs once on a short input before timing. The bytes of audio that leave the decode task per track
   are printed too, now (the first clip to try, channels kept) and as before this change (every clip, mono).
2. Projection (`--project-tracks N --cpus C --gpus G`): the wall time of preprocessing N tracks from the rates,
   with the assumptions printed: tracks of --track-minutes (default: the mean DURATION of --metadata when
   given, else 4.0 min), --clips-tried clips separated per track, one kept clip per track (an upper bound on
   codec and text work). Decoding runs on the CPUs; the model stages run on the GPUs only when their rates were
   measured on one (--device cuda), otherwise on the CPUs too. Ray Data streams the stages concurrently, so the
   wall time is the busier resource's work divided by its count; the serial sum is printed as an upper bound.
3. Scaling (`--no-scaling` skips it): `decode_step` over the same set of files, run as Ray tasks with at most
   k in flight, for k = 1 and k = 2. Throughput is seconds of source audio decoded per second of wall time,
   from the first submission to the last completed task. The ratio throughput(k=2) / throughput(k=1) is the
   stage's scaling (target >= 1.7 on a 2-core machine).

How:
- The corpus is `pipelines.preprocess.corpus.writer.make_corpus(dir, N, seed=0)` (mono 44.1 kHz MP3, 60-100 s tracks),
  plus 16-bit 48 kHz WAV copies of some tracks, so that the resampler does real work too, and stereo MP3
  copies of others (a delayed copy on the right), used by the rates only.
- One local Ray runtime, `ray.init(num_cpus=2)`, for the whole run. Each task asks for 1 CPU, and the
  driver keeps at most k tasks in flight (submitting the next file when one finishes), so k is exactly
  the number of busy workers and the work is balanced dynamically, as Ray Data's map would balance it.
- Each task returns the shipped clip into the object store (as the pipeline's map step does) plus a small
  summary; the driver fetches only the summary, so the measurement is the stage, not a copy to the driver.
- Warm-up: before timing, two tasks run at once, so both worker processes exist and have imported
  numpy / soundfile / soxr (the first task on a fresh worker pays those imports).
- One measurement decodes the whole file list `--passes` times (a file takes ~0.1 s, so one pass alone
  would be too short to time against Ray's per-task latency and other load on the machine).
- Each k is measured `--repeats` times, alternating k = 1 and k = 2 so that drift in the machine's speed
  affects both alike. The ratio of the medians is the result (`scaling_2_vs_1`); the ratio of the best
  runs (`scaling_2_vs_1_best`) is printed too: other load on the machine only ever adds time, so when the
  two disagree the machine was busy. The load average before and after, and the CPU seconds the tasks got
  per wall second ("cores used"), are printed too: with k = 2 it should be close to 2.
- Plain tasks rather than a Ray Data pipeline: on 2 cores, Ray Data's streaming executor and its
  per-operator bookkeeping compete with the workers for the same CPUs, so its overhead would be measured
  as part of the stage; plain tasks with a fixed concurrency measure how the stage itself scales.

    python bench/preprocess.py [--tracks 12] [--wav48 4] [--stereo 4] [--passes 4] [--repeats 5] [--corpus DIR]
        [--no-rates] [--no-scaling] [--separator P --codec P --text-encoder P --device cuda] [--rate-clips 2]
        [--project-tracks 55000 --cpus 64 --gpus 1 [--track-minutes M | --metadata TSV] --clips-tried 1.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preprocess.audio import CLIP_SECONDS, SAMPLE_RATE  # noqa: E402
from pipelines.preprocess.corpus.writer import CorpusManifest, make_corpus  # noqa: E402
from pipelines.preprocess.steps import decode_step  # noqa: E402

TARGET = 1.7


def build_files(root: Path, n_tracks: int, n_wav48: int, n_stereo: int = 0) -> list[Path]:
    """The MP3 corpus under root (reused when its manifest is there) plus 48 kHz WAV copies of some tracks and
    stereo MP3 copies of others (Jamendo's MP3s are stereo; the corpus' are mono)."""
    manifest_path = root / "corpus.json"
    if manifest_path.is_file() and len(CorpusManifest.load(root).tracks) == n_tracks:
        manifest = CorpusManifest.load(root)
    elif manifest_path.is_file():  # its WAV and stereo copies would be reused too: a mix of two corpora
        sys.exit(f"--corpus {root} holds a corpus of {len(CorpusManifest.load(root).tracks)} tracks, not --tracks "
                 f"{n_tracks}: delete it or choose another --corpus")  # fmt: skip
    else:
        manifest = make_corpus(root, n_tracks, seed=0, progress=False, workers=min(2, os.cpu_count() or 1))
    mp3s = [manifest.audio_path(t) for t in manifest.ids()]
    wav_dir = root / "wav48"
    wav_dir.mkdir(exist_ok=True)
    wavs = []
    for mp3 in mp3s[:n_wav48]:
        wav = wav_dir / (mp3.stem + ".wav")
        if not wav.is_file():
            x, sr = sf.read(mp3, dtype="float32")
            sf.write(wav, soxr.resample(x, sr, 48000, quality="HQ"), 48000, subtype="PCM_16")
        wavs.append(wav)
    stereo = []
    for mp3 in mp3s[n_wav48 : n_wav48 + n_stereo]:
        out = wav_dir / (mp3.stem + "_stereo.mp3")
        if not out.is_file():
            x, sr = sf.read(mp3, dtype="float32")
            right = np.concatenate([np.zeros(int(0.011 * sr), np.float32), x[: len(x) - int(0.011 * sr)]])
            sf.write(out, np.stack([x, 0.8 * right], 1), sr, format="MP3")  # a delayed, quieter copy on the right
        stereo.append(out)
    return mp3s + wavs + stereo


def file_kind(path: Path) -> str:
    return "mp3 stereo" if path.stem.endswith("_stereo") else {".mp3": "mp3 mono", ".wav": "wav 48k mono"}[path.suffix]


def make_task(ray):
    @ray.remote(num_cpus=1, num_returns=2)
    def decode(path: str):
        cpu0 = time.process_time()
        row = decode_step(dict(track_id=Path(path).stem, path=path), sample_rate=SAMPLE_RATE,
                          clip_seconds=CLIP_SECONDS, seed=0)  # fmt: skip
        if row["status"] != "ok":
            raise RuntimeError(f"{path}: {row['reason']}")
        # what the pipeline's decode step emits: the first clip to try, (1, T, C)
        return {"clips": len(row["clip_starts"]), "pid": os.getpid(), "cpu": time.process_time() - cpu0}, row["clips"]

    return decode


def run_stage(ray, task, paths: list[str], k: int) -> tuple[float, float, set[int]]:
    """Decode every path with at most k tasks in flight; returns (wall seconds, task CPU seconds, worker pids)."""
    pending: dict = {}  # summary ref -> clips ref (kept alive until the task is done)
    todo = list(paths)
    pids: set[int] = set()
    cpu = 0.0
    t0 = time.perf_counter()
    while todo or pending:
        while todo and len(pending) < k:
            summary_ref, clips_ref = task.remote(todo.pop(0))
            pending[summary_ref] = clips_ref
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            summary = ray.get(ref)
            pids.add(summary["pid"])
            cpu += summary["cpu"]
            del pending[ref]  # drops the clips too: nothing downstream consumes them here
    return time.perf_counter() - t0, cpu, pids


# --- 1. per-stage rates ------------------------------------------------------------------------------------


def _timed(fn, device: str) -> float:
    """Wall seconds of fn() (CUDA synchronised on a GPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_decode(files: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    """CPU seconds of decode_step per minute of source audio, by kind of file; and the bytes each track ships."""
    by_kind: dict[str, dict] = {}
    tracks = []
    for path in files:
        cpu0 = time.process_time()
        row = decode_step(dict(track_id=path.stem, path=str(path)), sample_rate=SAMPLE_RATE,
                          clip_seconds=CLIP_SECONDS, seed=0)  # fmt: skip
        cpu = time.process_time() - cpu0
        minutes = sf.info(path).duration / 60
        kind = by_kind.setdefault(file_kind(path), {"cpu": 0.0, "minutes": 0.0, "files": 0})
        kind["cpu"] += cpu
        kind["minutes"] += minutes
        kind["files"] += 1
        n_clips = len(row["clip_starts"])
        # before: every clip of the track, mono float32, left the decode task
        before = n_clips * int(round(CLIP_SECONDS * SAMPLE_RATE)) * 4
        tracks.append({"kind": file_kind(path), "clips": n_clips, "now": int(row["decode_bytes"]), "before": before})
    for kind in by_kind.values():
        kind["s_per_min"] = kind["cpu"] / kind["minutes"]
    return by_kind, tracks


def measure_models(args, files: list[Path], tmp: Path) -> dict[str, dict]:
    """Seconds per minute of audio for separation, codec encode and text embedding, on args.device."""
    import torch

    from modeling.pretrained.codec import encode_codes, load_codec
    from modeling.pretrained.separator import load_separator, remove_vocals
    from modeling.pretrained.text_encoder import TextEncoder

    if args.device == "cpu":
        torch.set_num_threads(1)  # as in a 1-CPU actor: wall seconds are CPU seconds
    paths = dict(separator=args.separator, codec=args.codec, text_encoder=args.text_encoder)
    tiny = [k for k, v in paths.items() if v is None]
    if tiny:
        from modeling.pretrained.tiny import make_tiny_pretrained

        made = make_tiny_pretrained(tmp / "pretrained")
        paths.update({k: made[k] for k in tiny})
    clips = []  # 30 s stereo clips at 44.1 kHz, as selection gets them
    for path in files:
        row = decode_step(dict(track_id=path.stem, path=str(path)), sample_rate=SAMPLE_RATE,
                          clip_seconds=CLIP_SECONDS, seed=0)  # fmt: skip
        clip = row["clips"][0]
        clips.append(np.repeat(clip, 2, axis=1) if clip.shape[1] == 1 else clip)  # (T, 2)
        if len(clips) == args.rate_clips:
            break
    clip_minutes = CLIP_SECONDS / 60
    warm = slice(0, 8 * SAMPLE_RATE)  # 8 s: one separator segment
    out: dict[str, dict] = {}

    sep = load_separator(paths["separator"], device=args.device)
    run = lambda x: remove_vocals(sep, x, device=args.device, shifts=0)  # noqa: E731
    run(clips[0][warm])
    secs = [_timed(lambda c=c: run(c), args.device) for c in clips]
    mono = [run(c) for c in clips[:1]]  # the kept clip, for the codec
    out["separation"] = {"s_per_min": sum(secs) / (len(secs) * clip_minutes), "runs": len(secs), "unit": "clip"}

    codec = load_codec(paths["codec"], device=args.device)
    encode_codes(codec, mono[0][warm])
    secs = [_timed(lambda: encode_codes(codec, mono[0]), args.device) for _ in range(args.rate_clips)]
    out["codec"] = {"s_per_min": sum(secs) / (len(secs) * clip_minutes), "runs": len(secs), "unit": "clip"}

    text = TextEncoder(paths["text_encoder"], device=args.device)
    captions = [f"A calm piano piece with soft strings and a slow beat, number {i}." for i in range(16)]
    text(captions[:2])
    secs = _timed(lambda: text(captions), args.device)
    per_caption = secs / len(captions)
    out["text"] = {"s_per_min": per_caption / clip_minutes, "s_per_caption": per_caption, "runs": len(captions),
                   "unit": "caption"}  # fmt: skip
    for name in out:
        out[name]["device"] = args.device
    out["models"] = {k: str(v) + (" (tiny random)" if k in tiny else "") for k, v in paths.items()}
    return out


def print_rates(decode: dict[str, dict], tracks: list[dict], models: dict[str, dict] | None) -> None:
    print("\nper-stage rates (seconds of compute per minute of audio the stage works on)")
    for kind, r in sorted(decode.items()):
        print(f"  decode {kind:<13} {r['s_per_min']:8.3f} s/min  CPU  ({r['files']} files, {r['minutes']:.1f} min)")
    if models:
        for name in ("separation", "codec", "text"):
            r = models[name]
            extra = f", {r['s_per_caption'] * 1e3:.1f} ms per caption" if name == "text" else ""
            print(f"  {name:<20} {r['s_per_min']:8.3f} s/min  {r['device']}  ({r['runs']} {r['unit']}s{extra})")
        for k, v in models["models"].items():
            print(f"    {k}: {v}")
    now = sum(t["now"] for t in tracks) / len(tracks)
    before = sum(t["before"] for t in tracks) / len(tracks)
    clips = sum(t["clips"] for t in tracks) / len(tracks)
    print(f"audio leaving the decode task per track: {now / 1e6:.1f} MB now (the first clip to try, channels kept), "
          f"{before / 1e6:.1f} MB before (all {clips:.1f} clips, mono); "
          f"+{CLIP_SECONDS * SAMPLE_RATE * 4 / 1e6:.1f} MB per kept clip to the codec in both")  # fmt: skip


# --- 2. projection ------------------------------------------------------------------------------------------


def mean_track_minutes(metadata: str | None, default: float) -> tuple[float, str]:
    if metadata is None:
        return default, "--track-minutes"
    from pipelines.preprocess.jamendo import read_metadata

    tracks, _ = read_metadata(metadata)
    return sum(t.duration for t in tracks) / len(tracks) / 60, f"mean DURATION of {len(tracks)} tracks in {metadata}"


def project(args, decode: dict[str, dict], models: dict[str, dict]) -> dict:
    minutes, source = mean_track_minutes(args.metadata, args.track_minutes)
    n, clip_min = args.project_tracks, CLIP_SECONDS / 60
    decode_rate = decode.get("mp3 stereo", decode.get("mp3 mono"))["s_per_min"]
    work = {  # compute seconds per stage
        "decode": n * minutes * decode_rate,
        "separation": n * args.clips_tried * clip_min * models["separation"]["s_per_min"],
        "codec": n * clip_min * models["codec"]["s_per_min"],
        "text": n * models["text"]["s_per_caption"],
    }
    on_gpu = models["separation"]["device"].startswith("cuda") and args.gpus > 0
    cpu_work = work["decode"] + (0 if on_gpu else work["separation"] + work["codec"] + work["text"])
    gpu_work = work["separation"] + work["codec"] + work["text"] if on_gpu else 0.0
    cpu_wall = cpu_work / args.cpus
    gpu_wall = gpu_work / args.gpus if on_gpu else 0.0
    wall = max(cpu_wall, gpu_wall)
    serial = sum(work.values()) / (args.gpus if on_gpu else args.cpus)  # nothing overlapped: an upper bound
    print(f"\nprojection: {n} tracks on {args.cpus} CPUs and {args.gpus} GPUs")
    print(f"  assumptions: {minutes:.2f} min per track ({source}); {args.clips_tried} clips separated per track; "
          f"one kept clip per track; decode rate of {'stereo' if 'mp3 stereo' in decode else 'mono'} MP3")  # fmt: skip
    where = "GPUs (rates measured on GPU)" if on_gpu else "CPUs (rates measured on CPU: no GPU speed-up assumed)"
    print(f"  model stages on the {where}")
    for name, w in work.items():
        print(f"  {name:<11} {w / 3600:10.1f} compute-hours")
    print(f"  CPU busy {cpu_wall / 3600:.1f} h, GPU busy {gpu_wall / 3600:.1f} h")
    print(f"  projected wall time: {wall / 3600:.1f} h (stages streamed; the busier resource decides), "
          f"at most {max(serial, wall) / 3600:.1f} h if no two stages overlapped")  # fmt: skip
    return {"tracks": n, "cpus": args.cpus, "gpus": args.gpus, "track_minutes": round(minutes, 3),
            "clips_tried": args.clips_tried, "compute_hours": {k: round(v / 3600, 2) for k, v in work.items()},
            "models_on_gpu": on_gpu, "wall_hours": round(wall / 3600, 2)}  # fmt: skip


# --- 3. decode scaling, 1 vs 2 workers ------------------------------------------------------------------------


def measure_scaling(args, files: list[Path]) -> dict:
    paths = [str(p) for p in files] * args.passes
    audio_seconds = sum(sf.info(p).duration for p in files) * args.passes

    load_before = os.getloadavg()[0]
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private local runtime, no token needed
    import ray  # here: only this stage of the benchmark needs Ray, and after RAY_AUTH_MODE is set

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = make_task(ray)
        run_stage(ray, task, paths[:2], k=2)  # start both workers and pay their imports
        walls: dict[int, list[float]] = {1: [], 2: []}
        cores: dict[int, list[float]] = {1: [], 2: []}  # task CPU seconds / wall seconds
        workers: dict[int, set[int]] = {1: set(), 2: set()}
        for _ in range(args.repeats):
            for k in (1, 2):
                wall, cpu, pids = run_stage(ray, task, paths, k)
                walls[k].append(wall)
                cores[k].append(cpu / wall)
                workers[k] |= pids
    finally:
        ray.shutdown()

    load_after = os.getloadavg()[0]
    thr = {k: audio_seconds / statistics.median(w) for k, w in walls.items()}
    scaling = thr[2] / thr[1]
    scaling_best = min(walls[1]) / min(walls[2])
    per_run = f"{len(files)} files x {args.passes} passes = {audio_seconds:.0f} s of audio per run"
    print(f"\n{per_run}; median of {args.repeats} runs")
    header = f"{'workers':>7}  {'wall s per run':<36} {'median s':>8} {'best s':>7} {'audio s / wall s':>17}"
    print(f"{header}  {'cores used':>10}  processes")
    for k in (1, 2):
        runs = " ".join(f"{w:.2f}" for w in walls[k])
        median, best = statistics.median(walls[k]), min(walls[k])
        used = statistics.median(cores[k])
        print(f"{k:>7}  {runs:<36} {median:>8.2f} {best:>7.2f} {thr[k]:>17.1f}  {used:>10.2f}  {len(workers[k]):>9}")
    verdict = "meets" if scaling >= TARGET else "below"
    print(f"scaling 2 vs 1 workers: {scaling:.2f}x from the medians ({verdict} the {TARGET} target)")
    print(f"                        {scaling_best:.2f}x from the best runs")
    print(f"load average: {load_before:.1f} before, {load_after:.1f} after (2 would be a fully busy 2-core machine)")
    print("cores used: the tasks' CPU seconds per wall second; well under k means the workers waited for a CPU")
    result = {
        "scaling_2_vs_1": round(scaling, 3),
        "scaling_2_vs_1_best": round(scaling_best, 3),
        "throughput_1_worker": round(thr[1], 2),
        "throughput_2_workers": round(thr[2], 2),
        "audio_seconds": round(audio_seconds, 1),
        "files": len(files),
        "passes": args.passes,
        "repeats": args.repeats,
        "target": TARGET,
        "cores_used": {k: round(statistics.median(v), 2) for k, v in cores.items()},
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=12, help="MP3 tracks in the generated corpus")
    parser.add_argument("--wav48", type=int, default=4, help="of which this many also get a 48 kHz WAV copy")
    parser.add_argument("--stereo", type=int, default=4, help="and this many others a stereo MP3 copy")
    parser.add_argument("--passes", type=int, default=4, help="times each measurement decodes every file")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per worker count (median taken)")
    parser.add_argument("--corpus", default=None, help="folder for the corpus, kept and reused (default: temporary)")
    parser.add_argument("--no-rates", dest="rates", action="store_false", help="skip the per-stage rates")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the 1 vs 2 workers run")
    parser.add_argument("--separator", default=None, help="HTDemucs path or name (default: a tiny random one)")
    parser.add_argument("--codec", default=None, help="DAC path or id (default: a tiny random one)")
    parser.add_argument("--text-encoder", default=None, help="Flan-T5 folder or hub id (default: a tiny random one)")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu or cuda")
    parser.add_argument("--rate-clips", type=int, default=2, help="30 s clips timed per model stage")
    parser.add_argument("--project-tracks", type=int, default=0, help="project the wall time of this many tracks")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the projected cluster")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the projected cluster")
    parser.add_argument("--track-minutes", type=float, default=4.0, help="mean track length for the projection")
    parser.add_argument("--metadata", default=None, help="a Jamendo TSV: its mean DURATION replaces --track-minutes")
    parser.add_argument("--clips-tried", type=float, default=1.3, help="clips separated per track (projection)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)
    if args.project_tracks and not args.rates:
        parser.error("--project-tracks needs the rates (drop --no-rates)")
    if args.project_tracks and args.device.startswith("cuda") and args.gpus < 1:
        parser.error("rates measured on a GPU project onto GPUs: give --gpus")

    tmp = tempfile.TemporaryDirectory(prefix="simba-bench-preprocess-")
    if args.corpus is None:
        root = Path(tmp.name) / "corpus"
    else:
        root = Path(args.corpus)
    root.mkdir(parents=True, exist_ok=True)
    n_wav, n_stereo = min(args.wav48, args.tracks), min(args.stereo, max(0, args.tracks - args.wav48))
    print(f"corpus: {args.tracks} MP3 tracks + {n_wav} 48 kHz WAV + {n_stereo} stereo MP3 copies in {root}", flush=True)
    print(f"CPU: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    t0 = time.perf_counter()
    files = build_files(root, args.tracks, args.wav48, n_stereo)
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s", flush=True)
    result: dict = {}
    try:
        if args.rates:
            decode, tracks = measure_decode(files)
            models = measure_models(args, files, Path(tmp.name))
            print_rates(decode, tracks, models)
            result["rates_s_per_min"] = {f"decode {k}": round(v["s_per_min"], 4) for k, v in decode.items()}
            result["rates_s_per_min"].update(
                {k: round(models[k]["s_per_min"], 4) for k in ("separation", "codec", "text")}
            )
            result["models"] = models["models"]
            result["device"] = args.device
            result["decode_mb_per_track"] = {
                "now": round(sum(t["now"] for t in tracks) / len(tracks) / 1e6, 2),
                "before": round(sum(t["before"] for t in tracks) / len(tracks) / 1e6, 2),
            }
            if args.project_tracks:
                result["projection"] = project(args, decode, models)
            print(f"load average {os.getloadavg()[0]:.1f} after the rates", flush=True)
        if args.scaling:
            result.update(measure_scaling(args, [f for f in files if file_kind(f) != "mp3 stereo"]))
    finally:
        tmp.cleanup()
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
