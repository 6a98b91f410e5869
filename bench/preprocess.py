"""Scaling of preprocessing's CPU stage: decode + downmix + resample + split into clips, 1 vs 2 Ray workers.

What is measured: `pipelines.preprocess.audio.decode_track` (the whole decode stage of `pipelines/preprocess/graph.py`:
libsndfile decode -> mono -> soxr HQ resample to 44.1 kHz -> 30 s clips) over the same set of files, run
as Ray tasks with at most k in flight, for k = 1 and k = 2. Throughput is seconds of source audio
decoded per second of wall time, from the first submission to the last completed task. The ratio
throughput(k=2) / throughput(k=1) is the stage's scaling (target >= 1.7 on a 2-core machine).

How:
- The corpus is `pipelines.preprocess.corpus.writer.make_corpus(dir, N, seed=0)` (mono 44.1 kHz MP3, 60-100 s tracks),
  plus 16-bit 48 kHz WAV copies of some tracks, so that the resampler does real work too.
- One local Ray runtime, `ray.init(num_cpus=2)`, for the whole run. Each task asks for 1 CPU, and the
  driver keeps at most k tasks in flight (submitting the next file when one finishes), so k is exactly
  the number of busy workers and the work is balanced dynamically, as Ray Data's map would balance it.
- Each task returns the clips into the object store (as the pipeline's map step does) plus a small
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

    python bench/preprocess.py [--tracks 12] [--wav48 4] [--passes 4] [--repeats 5] [--corpus DIR] [--json]
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

from pipelines.preprocess.audio import SAMPLE_RATE, decode_track  # noqa: E402
from pipelines.preprocess.corpus.writer import CorpusManifest, make_corpus  # noqa: E402

TARGET = 1.7


def build_files(root: Path, n_tracks: int, n_wav48: int) -> list[Path]:
    """The MP3 corpus under root (reused when its manifest is there) plus 48 kHz WAV copies of some tracks."""
    manifest_path = root / "corpus.json"
    if manifest_path.is_file() and len(CorpusManifest.load(root).tracks) == n_tracks:
        manifest = CorpusManifest.load(root)
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
    return mp3s + wavs


def make_task(ray):
    @ray.remote(num_cpus=1, num_returns=2)
    def decode(path: str):
        cpu0 = time.process_time()
        clips, reject = decode_track(Path(path).stem, path, sample_rate=SAMPLE_RATE)
        if reject is not None:
            raise RuntimeError(f"{path}: {reject.reason}")
        stacked = np.stack([c for _, c in clips])  # what the pipeline's decode step emits: (n_clips, T)
        return {"clips": len(clips), "pid": os.getpid(), "cpu": time.process_time() - cpu0}, stacked

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=12, help="MP3 tracks in the generated corpus")
    parser.add_argument("--wav48", type=int, default=4, help="of which this many also get a 48 kHz WAV copy")
    parser.add_argument("--passes", type=int, default=4, help="times each measurement decodes every file")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per worker count (median taken)")
    parser.add_argument("--corpus", default=None, help="folder for the corpus, kept and reused (default: temporary)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    tmp = None
    if args.corpus is None:
        tmp = tempfile.TemporaryDirectory(prefix="simba-bench-preprocess-")
        root = Path(tmp.name)
    else:
        root = Path(args.corpus)
        root.mkdir(parents=True, exist_ok=True)
    print(f"corpus: {args.tracks} MP3 tracks + {min(args.wav48, args.tracks)} 48 kHz WAV copies in {root}", flush=True)
    t0 = time.perf_counter()
    files = build_files(root, args.tracks, args.wav48)
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s", flush=True)
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
        if tmp is not None:
            tmp.cleanup()

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
    if args.json:
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
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
