"""Evaluation throughput on the CPU: the three embedders, and generation of 10 s clips by both decoders.

Evaluation generates 10 s (862 frames) per caption and embeds generated and reference clips with CLAP, PaSST
and VGGish. Both halves are timed here, with random weights (nothing is downloaded; speed does not depend on
the values, so these numbers are not the metrics' but their cost):

(a) 10 s clips per second through each embedder's production wrapper, from 44.1 kHz mono (what generation
    writes) through its resampling and features, a batch of `--clips` clips per call, median of the calls:
    - CLAP (`eval.clap.Clap`, audio tower): a random `ClapModel` at the size of LAION's music CLAP, i.e.
      transformers' default ClapConfig (RoBERTa-base text tower) with the audio tower of
      `laion/larger_clap_music` (HTSAT-base: 128-d patch embeddings, depths 2-2-12-2, width 1024), saved with
      a processor by `save_pretrained` and loaded back through `Clap`;
    - PaSST (`eval.kld.Passt`): PaSST-S built by hear21passt with `pretrained=False`, saved as a state dict;
    - VGGish (`eval.fad.Vggish`): torchvggish's (only) architecture, random, saved as a state dict.
(b) generation frames/s for evaluation at batch 1, 8 and 32 captions, with classifier-free guidance (2 rows
    per caption), top-k 250, at bench/generate.py's mid size: SiMBA with the eager step and with the compiled
    step (`modeling.compiled`, its weight-product strategy chosen as generation chooses it), and the Cross
    Transformer with its KV cache, all with their weights and states on huge pages as `prefill` puts them
    (`modeling.pages`). Each path runs the generation loop (step, CFG combine, top-k sampling) for
    a window of steps at positions spread over the clip; the time for 862 frames is the trapezoid integral
    of the per-step medians over those positions (exact for a cost linear in the position, as attention's
    is; SiMBA's is flat). Positions past 0 are reached by advancing the state's counters (the KV cache's
    length and mask, the position index) instead of prefilling 862 real tokens: a step's cost does not depend
    on the cached values, and a real prefill at batch 32 would take minutes. frames/s = captions x 862 / that
    time. The text prefill (once per batch) and the compiled step's one-off compilation are not in frames/s;
    the compilation is reported on its own.

    python bench/evaluate.py [--json] [--quick] [--batches 1 8 32] [--clips 4] [--threads N]

`--quick` (~1-2 minutes when inductor's cache is warm): fewer positions, steps and embedder calls. With
`--json` the last line is JSON, `simba_over_transformer_batch32` = SiMBA compiled frames/s over Transformer
frames/s at batch 32 (where SiMBA's constant-size state should pay off). Ratios are measured side by side in
one run on one machine; the CPU and load average are printed with them (others may share the machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generate import MID, N_FRAMES, TEXT_LEN  # noqa: E402
from bench.train_step import describe, load_average  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402
from modeling.builders import build_model  # noqa: E402
from modeling.compiled import compiled_step, cpu_name  # noqa: E402
from modeling.layers import DecodeState, KVCache, state_tensors  # noqa: E402
from modeling.lm import TextToMusicLM, with_null_condition  # noqa: E402
from modeling.pages import use_huge_pages  # noqa: E402
from modeling.sampling import cfg_combine, sample_next  # noqa: E402

SAMPLE_RATE = 44_100  # DAC's rate: what generation writes and the embedders resample from
CLIP_SECONDS = 10.0
BATCHES = (1, 8, 32)
CFG_SCALE = 3.0
TOP_K = 250
PATHS = ("simba eager", "simba compiled", "transformer")
# LAION's music CLAP (laion/larger_clap_music) audio tower, HTSAT-base; the rest is transformers' ClapConfig default.
CLAP_AUDIO = dict(
    patch_embeds_hidden_size=128, hidden_size=1024, depths=[2, 2, 12, 2], num_attention_heads=[4, 8, 16, 32]
)


# --------------------------------------------------------------------------------------------------- embedders


def make_clap(dir: Path) -> Path:
    """A random full-size CLAP with a processor, written by `save_pretrained` (the tiny tokenizer: text is untimed)."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from eval.tiny import tiny_clap_tokenizer

    torch.manual_seed(0)
    ClapModel(ClapConfig(audio_config=CLAP_AUDIO)).save_pretrained(dir)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(), tokenizer=tiny_clap_tokenizer()).save_pretrained(dir)
    return dir


def make_passt(path: Path) -> Path:
    """PaSST-S as hear21passt builds it, random (`pretrained=False`), saved as its state dict."""
    from eval.kld import DEFAULT_PASST, N_LABELS, _quiet

    with _quiet():
        from hear21passt.models.passt import get_model

        torch.manual_seed(0)
        net = get_model(arch=DEFAULT_PASST, pretrained=False, n_classes=N_LABELS)
    torch.save(net.state_dict(), path)
    return path


def make_vggish(path: Path) -> Path:
    """torchvggish's VGGish, random, saved as its state dict."""
    from torchvggish.torchvggish import VGG, make_layers

    torch.manual_seed(0)
    torch.save(VGG(make_layers(), postprocess=False).state_dict(), path)
    return path


def clips_per_second(embed: Callable[[np.ndarray], object], clips: np.ndarray, calls: int) -> float:
    """10 s clips per second of `embed(clips)`: one warm-up call on one clip, then the median of `calls`."""
    embed(clips[:1])
    seconds = []
    for _ in range(calls):
        t0 = time.perf_counter()
        embed(clips)
        seconds.append(time.perf_counter() - t0)
    return len(clips) / statistics.median(seconds)


def bench_embedders(n_clips: int, calls: int) -> dict[str, dict]:
    """Build each random embedder, load it through its production wrapper, and time it. Returns rows by name."""
    from transformers.utils import logging as hf_logging

    from eval.clap import Clap
    from eval.fad import Vggish
    from eval.kld import Passt

    hf_logging.disable_progress_bar()  # save_pretrained / from_pretrained bars would interleave with the table
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.standard_normal((n_clips, int(CLIP_SECONDS * SAMPLE_RATE)))).astype(np.float32)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        specs = {
            "CLAP": (lambda: Clap(make_clap(root / "clap")), lambda m: lambda x: m.embed_audio(x, SAMPLE_RATE)),
            "PaSST": (lambda: Passt(make_passt(root / "passt.pt")), lambda m: lambda x: m.label_probs(x, SAMPLE_RATE)),
            "VGGish": (lambda: Vggish(make_vggish(root / "vggish.pth")), lambda m: lambda x: m.embed(x, SAMPLE_RATE)),
        }
        for name, (load, method) in specs.items():
            t0 = time.perf_counter()
            model = load()
            build_s = time.perf_counter() - t0
            params = sum(p.numel() for p in model.model.parameters())
            rows[name] = dict(clips_per_s=clips_per_second(method(model), clips, calls), params=params, build_s=build_s)
            del model
    return rows


# --------------------------------------------------------------------------------------------------- generation


def advance(state: DecodeState, positions: int) -> None:
    """Move a freshly prefilled state `positions` frames on without computing them (timing only).

    A step's work depends on how many positions are cached (attention reads all of them), not on their values:
    the KV caches count `positions` more (zeros) keys and the position index moves on. SiMBA's state has a
    fixed size, so only its position index moves.
    """
    for layer in state.layers:
        cache = layer.mixer
        if isinstance(cache, KVCache):
            if cache.length + positions > cache.k.shape[2]:
                raise ValueError(f"the KV cache holds {cache.k.shape[2]} positions; cannot advance to {positions}")
            cache.key_mask[:, cache.length : cache.length + positions] = True
            cache.length += positions
    state.next_pos = state.next_pos + positions


@torch.no_grad()
def decode_seconds(step, state: DecodeState, captions: int, steps: int, warmup: int, seed: int = 0) -> float:
    """Median seconds per frame of the generation loop (step, CFG combine, top-k sampling) on `state`.

    The state goes onto huge pages first, as `prefill` puts every state (a deepcopy of one is plain memory):
    every path alike, a fair comparison."""
    use_huge_pages(state_tensors(state))
    generator = torch.Generator().manual_seed(seed)
    tok = torch.zeros(2 * captions, dtype=torch.long)
    seconds = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = step(tok, state).float()
        logits = cfg_combine(logits[:captions], logits[captions:], CFG_SCALE)
        logits[:, -1] = float("-inf")  # BOS/pad is never a frame, as generate does
        tok = sample_next(logits, top_k=TOP_K, generator=generator).repeat(2)
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _prefilled(model: TextToMusicLM, captions: int, max_len: int) -> DecodeState:
    g = torch.Generator().manual_seed(captions)
    text = torch.randn(captions, TEXT_LEN, model.text_dim, generator=g)
    text, mask = with_null_condition(text, torch.ones(captions, TEXT_LEN, dtype=torch.bool))  # cond + uncond rows
    bos = torch.full((2 * captions, 1), model.pad_id, dtype=torch.long)
    with torch.no_grad():
        return model.prefill(bos, text, mask, max_len=max_len)[1]


def integrate(positions: list[int], seconds: list[float]) -> float:
    """Seconds for one frame at each of positions[0]..positions[-1], from per-frame times measured at `positions`.

    The trapezoid over the measured points, plus half of each end (a sum over n points spans n - 1 intervals):
    exact when the time is linear in the position.
    """
    total = (seconds[0] + seconds[-1]) / 2
    for i in range(1, len(positions)):
        total += (positions[i] - positions[i - 1]) * (seconds[i] + seconds[i - 1]) / 2
    return total


@torch.no_grad()
def bench_generation(batches: tuple[int, ...], n_positions: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    models = {arch: build_model(ModelConfig(arch=arch, **MID)).eval() for arch in ("simba", "transformer")}
    simba, transformer = models["simba"], models["transformer"]
    pages = use_huge_pages(p for model in models.values() for p in model.parameters())  # as prefill does (and a report)
    fast = compiled_step(simba)
    positions = [round(i * (N_FRAMES - 1) / (n_positions - 1)) for i in range(n_positions)]
    max_len = N_FRAMES + warmup + steps + 1
    out = {"positions": positions, "batches": {}, "weight_pages": str(pages)}
    for captions in batches:
        # Compile (and with `auto`, time both strategies) for this batch shape, outside the measurement.
        t0 = time.perf_counter()
        fast(torch.zeros(2 * captions, dtype=torch.long), _prefilled(simba, captions, 4))
        compile_s = time.perf_counter() - t0
        choice = fast.choice(2 * captions) if hasattr(fast, "choice") else None
        per_step: dict[str, list[float]] = {path: [] for path in PATHS}
        for pos in positions:
            simba_state = _prefilled(simba, captions, max_len)
            advance(simba_state, pos)
            per_step["simba eager"].append(
                decode_seconds(simba.step, copy.deepcopy(simba_state), captions, steps, warmup)
            )
            per_step["simba compiled"].append(decode_seconds(fast, simba_state, captions, steps, warmup))
            tr_state = _prefilled(transformer, captions, max_len)
            advance(tr_state, pos)
            per_step["transformer"].append(decode_seconds(transformer.step, tr_state, captions, steps, warmup))
            del simba_state, tr_state
        row = {
            "compile_s": compile_s,
            "strategy": choice.strategy if choice else "eager (not compiled)",
            "strategy_ms_per_step": choice.ms_per_step if choice else {},
        }
        for path, seconds in per_step.items():
            total = integrate(positions, seconds)
            row[path] = dict(
                frames_per_s=captions * N_FRAMES / total,
                seconds_862=total,
                ms_per_step=[s * 1e3 for s in seconds],
            )
        out["batches"][captions] = row
    out["params"] = {arch: sum(p.numel() for p in m.parameters()) for arch, m in models.items()}
    return out


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--quick", action="store_true", help="2 positions, fewer steps and embedder calls")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="captions per batch")
    parser.add_argument("--clips", type=int, default=4, help="10 s clips per embedder call")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.clips < 1:
        parser.error("--batches and --clips must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_positions, steps, warmup, calls = (2, 4, 2, 2) if args.quick else (3, 8, 2, 3)

    load_before = load_average()
    t_start = time.perf_counter()
    embedders = bench_embedders(args.clips, calls)
    gen = bench_generation(tuple(args.batches), n_positions, steps, warmup)
    load_after = load_average()

    print(f"cpu: {cpu_name()}, {torch.get_num_threads()} threads; load average {load_before} before, "
          f"{load_after} after; {time.perf_counter() - t_start:.0f} s in all")  # fmt: skip
    print("random weights throughout (nothing downloaded): these are costs, not metric values")
    print(f"\nembedders: 10 s clips/s from {SAMPLE_RATE} Hz mono, {args.clips} clips per call, median of {calls} "
          f"calls (resampling and features included)")  # fmt: skip
    print(f"{'embedder':<10}{'params':>10}{'clips/s':>10}{'s/clip':>9}")
    for name, r in embedders.items():
        print(f"{name:<10}{r['params'] / 1e6:>9.1f}M{r['clips_per_s']:>10.2f}{1 / r['clips_per_s']:>9.2f}")
    params = gen["params"]
    print(f"\ngeneration for evaluation: {N_FRAMES} frames (10 s) per caption, CFG {CFG_SCALE} (2 rows per "
          f"caption), top-k {TOP_K}; mid size {describe(MID)}; SiMBA {params['simba'] / 1e6:.1f}M, Transformer "
          f"{params['transformer'] / 1e6:.1f}M parameters")  # fmt: skip
    print(f"frames/s = captions x {N_FRAMES} / time for {N_FRAMES} frames, integrated from per-step medians "
          f"({steps} steps) at positions {gen['positions']}; ms/step at the first and last position")  # fmt: skip
    print(f"every path's weights and states on huge pages, as generation puts them (weights: {gen['weight_pages']})")
    header = f"{'batch':>5}  " + "".join(f"{path + ' fr/s':>22}" for path in PATHS)
    print(header + f"{'compiled/tr':>13}{'eager/tr':>10}")
    for captions, row in gen["batches"].items():
        cells = "".join(f"{row[p]['frames_per_s']:>22.1f}" for p in PATHS)
        tr = row["transformer"]["frames_per_s"]
        print(f"{captions:>5}  {cells}{row['simba compiled']['frames_per_s'] / tr:>13.2f}"
              f"{row['simba eager']['frames_per_s'] / tr:>10.2f}")  # fmt: skip
        steps_ms = "".join(f"{row[p]['ms_per_step'][0]:>11.1f}{row[p]['ms_per_step'][-1]:>11.1f}" for p in PATHS)
        print(f"{'':>5}  {steps_ms}   ms/step")
    for captions, row in gen["batches"].items():
        timed = ", ".join(f"{s} {ms:.2f} ms" for s, ms in row["strategy_ms_per_step"].items())
        print(f"batch {captions}: compiled step strategy {row['strategy']}{' (timed: ' + timed + ')' if timed else ''}"
              f", compile {row['compile_s']:.1f} s (once per process and batch shape)")  # fmt: skip

    result = {
        "cpu_model": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "random_weights": True,
        "model": MID,
        "params": params,
        "n_frames": N_FRAMES,
        "positions": gen["positions"],
    }
    for name, r in embedders.items():
        result[f"{name.lower()}_clips_per_s"] = r["clips_per_s"]
    for captions, row in gen["batches"].items():
        for path in PATHS:
            result[f"{path.replace(' ', '_')}_frames_per_s_batch{captions}"] = row[path]["frames_per_s"]
        tr = row["transformer"]["frames_per_s"]
        result[f"simba_over_transformer_batch{captions}"] = row["simba compiled"]["frames_per_s"] / tr
        result[f"simba_eager_over_transformer_batch{captions}"] = row["simba eager"]["frames_per_s"] / tr
        result[f"strategy_batch{captions}"] = row["strategy"]
        result[f"compile_s_batch{captions}"] = row["compile_s"]
    if 32 in gen["batches"]:
        print(f"simba_over_transformer_batch32 {result['simba_over_transformer_batch32']:.2f} "
              f"(SiMBA compiled / Transformer frames/s)")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
