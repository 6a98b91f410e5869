"""Decode speed on the CPU: SiMBA's recurrent step vs the Transformer's KV cache vs full recomputation.

Per-token decode time is measured at two positions (~100 and ~2500 tokens already generated), batch 1
with classifier-free guidance (cond + uncond = 2 rows), on a mid-size configuration of each decoder:

- simba step:        one O(1) recurrent step (conv + SSM state per layer), eager PyTorch
- simba step (comp): the same step through `modeling.compiled.compiled_step` (what `generation.compile` uses)
- transformer cache: one KV-cache step (attention over all cached positions)
- recompute:         one full forward over the whole sequence, eager, what the paper's public code does per token

Then the time to generate 862 frames (10 s) is measured end to end for both SiMBA step paths (the compiled
one after its one-off compilation, which is reported on its own), and estimated for the recompute path by
integrating measured full-forward times over sequence lengths 1..862 (trapezoid over several measured
lengths: running it for real would take many minutes).

    python bench/generate.py [--json] [--repeats 5] [--compiled-baseline]

`--compiled-baseline` also times one recompute forward at 862 tokens under default torch.compile, to show
how much of the speed-up a compiled baseline would take back.

Targets (issue 2): simba_flatness <= 1.1, speedup_vs_recompute_862 >= 100. Ratios are measured side by
side in one run; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import ModelConfig  # noqa: E402
from modeling.builders import build_model  # noqa: E402
from modeling.compiled import compiled_step  # noqa: E402
from modeling.lm import TextToMusicLM, with_null_condition  # noqa: E402

# Mid-size: a quarter of the paper's width budget, so the recompute baseline stays measurable on 2 cores.
MID = dict(d_model=512, n_layers=12, mlp_dim=1024, n_heads=8, d_state=128, headdim=64, chunk_size=256, dropout=0.0)
TEXT_LEN = 32
N_FRAMES = 862
POSITIONS = (100, 2500)


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(model: TextToMusicLM, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, TEXT_LEN, model.text_dim, generator=g)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.bool)
    text, mask = with_null_condition(text, mask)  # cond + uncond rows, as generation runs them
    tokens = torch.randint(0, model.pad_id, (2, length), generator=g)
    tokens[:, 0] = model.pad_id
    return tokens, text, mask


@torch.no_grad()
def step_time(model: TextToMusicLM, position: int, repeats: int, step=None) -> float:
    """Seconds for one cached decoding step after `position` tokens (`step`: default model.step)."""
    step = step or model.step
    tokens, text, mask = _inputs(model, position)
    _, state = model.prefill(tokens, text, mask, max_len=position + repeats + 8)
    token = tokens[:, -1]
    # Each call advances the state by one position: fine for timing (a few positions past `position`).
    return _median_time(lambda: step(token, state), repeats)


@torch.no_grad()
def compile_time(model: TextToMusicLM) -> float:
    """Seconds of the compiled step's first call (the compilation), on a throwaway state."""
    tokens, text, mask = _inputs(model, 4)
    _, state = model.prefill(tokens, text, mask, max_len=8)
    t0 = time.perf_counter()
    compiled_step(model)(tokens[:, -1], state)
    return time.perf_counter() - t0


@torch.no_grad()
def recompute_time(model: TextToMusicLM, length: int, repeats: int) -> float:
    """Seconds for one full forward over `length` tokens (the recompute baseline's cost for one token)."""
    tokens, text, mask = _inputs(model, length)
    return _median_time(lambda: model(tokens, text, mask), repeats, warmup=1)


@torch.no_grad()
def generate_time(model: TextToMusicLM, n_frames: int, compile: bool = False) -> float:
    _, text, mask = _inputs(model, 1)
    t0 = time.perf_counter()
    model.generate(text[:1], mask[:1], n_frames, top_k=250, cfg_scale=3.0, seed=0, compile=compile)
    return time.perf_counter() - t0


@torch.no_grad()
def compiled_recompute_ratio(model: TextToMusicLM, length: int, repeats: int) -> float:
    """Eager / default-torch.compile time of one full forward over `length` tokens."""
    tokens, text, mask = _inputs(model, length)
    forward = torch.compile(model, dynamic=False)
    forward(tokens, text, mask)  # compile
    compiled = _median_time(lambda: forward(tokens, text, mask), repeats, warmup=1)
    return recompute_time(model, length, repeats) / compiled


def recompute_total(model: TextToMusicLM, n_frames: int, repeats: int, points: int = 5) -> float:
    """Estimated seconds to generate n_frames by recomputation: integral of forward time over lengths."""
    lengths = [max(1, round(i * n_frames / (points - 1))) for i in range(points)]
    times = [recompute_time(model, n, repeats) for n in lengths]
    total = times[0]
    for i in range(1, points):
        total += (lengths[i] - lengths[i - 1]) * (times[i] + times[i - 1]) / 2
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the ratios")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compiled-baseline", action="store_true", help="also time a compiled recompute forward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    simba = build_model(ModelConfig(arch="simba", **MID)).eval()
    transformer = build_model(ModelConfig(arch="transformer", **MID)).eval()

    compile_s = compile_time(simba)
    fast_step = compiled_step(simba)
    rows = {}
    for pos in POSITIONS:
        rows[("simba step", pos)] = step_time(simba, pos, args.repeats * 4)
        rows[("simba step (compiled)", pos)] = step_time(simba, pos, args.repeats * 4, fast_step)
        rows[("transformer kv cache", pos)] = step_time(transformer, pos, args.repeats * 4)
        rows[("simba recompute", pos)] = recompute_time(simba, pos, args.repeats)

    gen_simba = generate_time(simba, N_FRAMES)
    gen_compiled = generate_time(simba, N_FRAMES, compile=True)
    gen_recompute = recompute_total(simba, N_FRAMES, args.repeats)
    baseline_ratio = compiled_recompute_ratio(simba, N_FRAMES, args.repeats) if args.compiled_baseline else None

    n_params = sum(p.numel() for p in simba.parameters())
    print(f"mid-size config: {MID}, SiMBA {n_params / 1e6:.1f}M params, batch 1 + CFG (2 rows), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'path':<24}{'ms/token @' + str(POSITIONS[0]):>16}{'ms/token @' + str(POSITIONS[1]):>16}{'ratio':>8}")
    for name in ("simba step", "simba step (compiled)", "transformer kv cache", "simba recompute"):
        a, b = rows[(name, POSITIONS[0])], rows[(name, POSITIONS[1])]
        print(f"{name:<24}{a * 1e3:>16.2f}{b * 1e3:>16.2f}{b / a:>8.2f}")
    print(f"compiling the SiMBA step took {compile_s:.1f} s (once per process, model and batch size)")
    print(f"generate {N_FRAMES} frames: SiMBA compiled step {gen_compiled:.1f} s, eager step {gen_simba:.1f} s "
          f"(measured), recompute {gen_recompute:.1f} s (integrated from measured forwards)")  # fmt: skip
    if baseline_ratio is not None:
        print(f"recompute forward @{N_FRAMES} tokens: eager / default torch.compile = {baseline_ratio:.2f}")

    def flatness(name: str) -> float:
        return rows[(name, POSITIONS[1])] / rows[(name, POSITIONS[0])]

    result = {
        "simba_flatness": flatness("simba step (compiled)"),
        "simba_flatness_eager": flatness("simba step"),
        "transformer_flatness": flatness("transformer kv cache"),
        "speedup_vs_recompute_862": gen_recompute / gen_compiled,
        "speedup_vs_recompute_862_eager": gen_recompute / gen_simba,
        "speedup_incl_compile_862": gen_recompute / (gen_compiled + compile_s),
        "simba_ms_per_token": rows[("simba step (compiled)", POSITIONS[0])] * 1e3,
        "simba_ms_per_token_eager": rows[("simba step", POSITIONS[0])] * 1e3,
        "compile_s": compile_s,
        "generate_862_simba_s": gen_compiled,
        "generate_862_simba_eager_s": gen_simba,
        "generate_862_recompute_s": gen_recompute,
    }
    if baseline_ratio is not None:
        result["recompute_eager_over_compiled_862"] = baseline_ratio
    print(f"simba_flatness {result['simba_flatness']:.3f} (target <= 1.1), "
          f"speedup_vs_recompute_862 {result['speedup_vs_recompute_862']:.0f}x (target >= 100; "
          f"eager step {result['speedup_vs_recompute_862_eager']:.0f}x)")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
