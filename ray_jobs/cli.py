"""`simba-ttm <job> ...`: one console script over the thin job entrypoints (`python -m ray_jobs.<job>`)."""

from __future__ import annotations

import importlib
import sys

# job name -> module with `main(argv: list[str] | None) -> int`
JOBS = {
    "info": ("ray_jobs.info", "size, FLOPs, memory and cache of a configured model"),
    "make-corpus": ("ray_jobs.make_corpus", "write a small synthetic corpus in the MTG-Jamendo layout"),
    "preprocess": ("ray_jobs.preprocess", "Jamendo audio -> DAC tokens + T5 embeddings (Ray Data -> Parquet)"),
    "make-evalset": ("ray_jobs.make_evalset", "caption CSV + audio -> eval set: T5 features, references, DAC codes"),
    "train": ("ray_jobs.train", "train Prefix SiMBA or the Cross Transformer on Ray Train, logging to MLflow"),
    "tune": (
        "ray_jobs.tune",
        "hyperparameter search over the training loop on Ray Tune (ASHA), trials nested in MLflow",
    ),
    "generate": ("ray_jobs.generate", "WAV + spectrogram for prompts from a checkpoint"),
    "evaluate": ("ray_jobs.evaluate", "FAD, KLD, CLAP of a checkpoint (or every checkpoint of a run), to MLflow"),
    "figure3": ("ray_jobs.figure3", "the paper's Fig. 3: FAD, KLD, CLAP and losses over steps of MLflow runs"),
    "codebooks": ("ray_jobs.codebooks", "the paper's Fig. 1: FAD and CLAP of DAC decodes from k = 1..9 codebooks"),
    "demo": ("ray_jobs.demo", "corpus -> preprocess -> train both decoders -> generate, on a CPU in minutes"),
}


def _usage() -> str:
    lines = ["usage: simba-ttm <job> [args...]", "", "jobs:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in JOBS.items()]
    lines += ["", "Run `simba-ttm <job> --help` for a job's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a script that lost its job name must not look like a success
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"simba-ttm: unknown job {job!r}; valid jobs: {', '.join(JOBS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[job][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
