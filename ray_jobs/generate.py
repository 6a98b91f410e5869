"""`simba-ttm generate --checkpoint PATH (--prompt TEXT ... | --prompts FILE) [options]`: captions -> WAV + PNG.

Sampling options default to the checkpoint's own `generation` config, and the text encoder and codec to its
`preprocess.text_encoder` / `preprocess.codec`. `--checkpoint` takes a model file, a checkpoint directory or a
whole training run folder: its highest step, or with `--pick best` the checkpoint of its lowest validation loss.
Each call writes a new folder `<out>/<run name>-step<N>` (`-2`, `-3`, ... when taken; nothing is overwritten):
a WAV and a spectrogram PNG per caption, written batch by batch, and `prompts.json`, which says what made each
clip (checkpoint, step, sampling settings, seed).
Relative paths (not --prompts) resolve against $SIMBA_TTM_ROOT when set, else the working directory. Runs where
it is started: `ray job submit ... -- simba-ttm generate ... --device cuda` runs it on a GPU box (with
$SIMBA_TTM_ROOT or absolute paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import itertools
import sys
import time
from pathlib import Path

from configs import ConfigError
from modeling.pretrained.errors import MissingWeightsError
from pipelines.paths import check_job_paths, check_output_folder, resolve_path, resolve_path_or_id
from ray_jobs.common import fail

PROG = "simba-ttm generate"


def _read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def new_folder(out: Path, name: str) -> Path:
    """A folder made for this call: `out/name`, else `out/name-2`, `-3`, ... (never one an earlier call wrote)."""
    for k in itertools.count(1):
        folder = out / (name if k == 1 else f"{name}-{k}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt, a checkpoint directory, or a run folder")
    parser.add_argument(
        "--pick",
        choices=["last", "best"],
        default="last",
        help="in a run folder: the highest step (last) or the lowest validation loss (best)",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a caption (repeat for several)")
    prompts.add_argument("--prompts", metavar="FILE", help="a text file with one caption per non-empty line")
    sampling = parser.add_argument_group("sampling (default: the checkpoint's generation config)")
    sampling.add_argument("--seconds", type=float, help="length of each clip")
    sampling.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale (1 = none)")
    sampling.add_argument("--top-k", type=int, help="0 disables")
    sampling.add_argument("--top-p", type=float, help="0 disables")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--batch-size", type=int, help="captions per batch")
    sampling.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode with the compiled SiMBA step (one-off compilation, then ~4x faster per token on a CPU)",
    )
    parser.add_argument(
        "--out",
        default="outputs/generate",
        help="where each call makes its folder <run name>-step<N> (default: %(default)s)",
    )
    parser.add_argument("--text-encoder", help="Flan-T5 directory or hub id (default: preprocess.text_encoder)")
    parser.add_argument("--codec", help="DAC .pth or id (default: preprocess.codec)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args(argv)
    try:
        # Inside a Ray job, relative paths would point into Ray's temporary copy of the working directory.
        check_job_paths(args={"--checkpoint": args.checkpoint, "--out": args.out})
        check_output_folder("--out", args.out)
        checkpoint, out = resolve_path(args.checkpoint), resolve_path(args.out)  # against $SIMBA_TTM_ROOT when set
    except ConfigError as err:
        return fail(PROG, err)

    # Imported here, after the arguments and config are read: --help and a bad flag or config answer at once,
    # without the seconds that importing torch, dac and transformers takes.
    import torch

    from modeling.pretrained.codec import load_codec
    from modeling.pretrained.text_encoder import TextEncoder
    from pipelines.generation import INDEX_FILE, generate_audio, sampling_options, write_samples
    from pipelines.train.checkpoints import find_checkpoint, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return fail(PROG, "--device cuda was given but no CUDA device is available")
    try:
        captions = args.prompt if args.prompt else _read_prompts(args.prompts)
    except (OSError, UnicodeDecodeError) as err:
        return fail(PROG, f"cannot read --prompts (a UTF-8 text file, one caption per line): {err}")
    if not captions or not all(c.strip() for c in captions):
        return fail(PROG, "no prompts: give non-empty --prompt TEXT or a --prompts FILE with one caption per line")

    try:
        file = find_checkpoint(checkpoint, pick=args.pick)
        model, cfg, step = load_model(file, device=device)
        given = {
            name: getattr(args, name)
            for name in ("seconds", "cfg_scale", "top_k", "top_p", "temperature", "seed", "batch_size", "compile")
            if getattr(args, name) is not None
        }
        gen = dataclasses.replace(cfg.generation, **given)  # re-validated: a bad flag is a ConfigError
        n_frames = gen.n_frames(cfg.data.frame_rate)
        print(f"checkpoint {file} (run {cfg.name!r}, step {step}, {cfg.model.arch})")
        print(f"{n_frames} frames per clip on {device}")
        text_encoder = TextEncoder(
            resolve_path_or_id(args.text_encoder or cfg.preprocess.text_encoder),
            device=device,
            max_length=cfg.preprocess.text_max_length,
            setting="--text-encoder (or preprocess.text_encoder in the checkpoint config)",
        )
        codec = load_codec(
            resolve_path_or_id(args.codec or cfg.preprocess.codec),
            device=device,
            setting="--codec (or preprocess.codec in the checkpoint config)",
        )
    except (MissingWeightsError, FileNotFoundError, ConfigError, ValueError) as err:
        return fail(PROG, err)

    folder = new_folder(out, f"{cfg.name}-step{step}")
    about = {"checkpoint": str(file), "run": cfg.name, "arch": cfg.model.arch, "step": step, "generation": {
        k: getattr(gen, k) for k in ("seconds", "top_k", "top_p", "temperature", "cfg_scale", "batch_size", "compile")
    }}  # fmt: skip
    written: list = []
    start = time.perf_counter()

    def write_batch(batch: list) -> None:  # as each batch is decoded: an interrupted call keeps what it made
        written.extend(write_samples(batch, folder, first=len(written), about=about))
        print(f"  {len(written)}/{len(captions)} clips ({time.perf_counter() - start:.1f} s)", flush=True)

    n_batches = -(-len(captions) // gen.batch_size)
    print(f"-> {folder}: {len(captions)} clip(s) in {n_batches} batch(es) of up to {gen.batch_size}", flush=True)
    if gen.compile and cfg.model.arch == "simba":
        print("  the first batch compiles the decoding step (once per batch size; tens of seconds on a CPU)")
    try:
        generate_audio(
            model, captions, text_encoder=text_encoder, codec=codec, device=device, on_batch=write_batch,
            **sampling_options(gen, cfg.data.frame_rate),
        )  # fmt: skip
    except ValueError as err:  # a text encoder of another width than the model's
        return fail(PROG, err)
    except (torch.OutOfMemoryError, MemoryError, OSError) as err:
        if isinstance(err, OSError) and err.errno != errno.ENOMEM:
            raise
        kept = f" ({len(written)} clips written to {folder})" if written else ""
        rows = min(gen.batch_size, len(captions))
        return fail(
            PROG, f"out of memory for {n_frames} frames x {rows} captions on {device} ({err}): lower --seconds or "
            f"--batch-size{kept}",
        )  # fmt: skip
    finally:
        if not any(folder.iterdir()):  # nothing made: no empty folder left behind
            folder.rmdir()
    elapsed = time.perf_counter() - start
    for s in written:
        print(f"{s.caption!r} -> {s.wav}, {s.png}")
    audio_seconds = sum(len(s.audio) / s.sample_rate for s in written)
    print(
        f"{len(written)} clips, {audio_seconds:.1f} s of audio in {elapsed:.1f} s "
        f"(real-time factor {elapsed / audio_seconds:.2f}: compute seconds per audio second); "
        f"index: {folder / INDEX_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
