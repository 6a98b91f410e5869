"""Decode speed on the CPU: SiMBA's recurrent step vs the Transformer's KV cache vs full recomputation.

Per-token decode time is measured at two positions (~100 and ~2500 tokens already generated), batch 1
with classifier-free guidance (cond + uncond = 2 rows), on a mid-size configuration of each decoder:

- simba step:        one O(1) recurrent step (conv + SSM state per layer)
- transformer cache: one KV-cache step (attention over all cached positions)
- recompute:         one full forward over the whole sequence, what the paper's public code does per token

Then the time to generate 862 frames (10 s) is measured end to end for the SiMBA step path, and estimated
for the recompute path by integrating measured full-forward times over sequence lengths 1..862
(trapezoid over several measured lengths: running it for real would take minutes per point).

    python bench/generate.py [--json] [--repeats 5]

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
def step_time(model: TextToMusicLM, position: int, repeats: int) -> float:
    """Seconds for one cached decoding step after `position` tokens."""
    tokens, text, mask = _inputs(model, position)
    _, state = model.prefill(tokens, text, mask, max_len=position + repeats + 8)
    token = tokens[:, -1]
    # Each call advances the state by one position: fine for timing (a few positions past `position`).
    return _median_time(lambda: model.step(token, state), repeats)


@torch.no_grad()
def recompute_time(model: TextToMusicLM, length: int, repeats: int) -> float:
    """Seconds for one full forward over `length` tokens (the recompute baseline's cost for one token)."""
    tokens, text, mask = _inputs(model, length)
    return _median_time(lambda: model(tokens, text, mask), repeats, warmup=1)


@torch.no_grad()
def generate_time(model: TextToMusicLM, n_frames: int) -> float:
    _, text, mask = _inputs(model, 1)
    t0 = time.perf_counter()
    model.generate(text[:1], mask[:1], n_frames, top_k=250, cfg_scale=3.0, seed=0)
    return time.perf_counter() - t0


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    simba = build_model(ModelConfig(arch="simba", **MID)).eval()
    transformer = build_model(ModelConfig(arch="transformer", **MID)).eval()

    rows = {}
    for pos in POSITIONS:
        rows[("simba step", pos)] = step_time(simba, pos, args.repeats * 4)
        rows[("transformer kv cache", pos)] = step_time(transformer, pos, args.repeats * 4)
        rows[("simba recompute", pos)] = recompute_time(simba, pos, args.repeats)

    gen_simba = generate_time(simba, N_FRAMES)
    gen_recompute = recompute_total(simba, N_FRAMES, args.repeats)

    n_params = sum(p.numel() for p in simba.parameters())
    print(f"mid-size config: {MID}, SiMBA {n_params / 1e6:.1f}M params, batch 1 + CFG (2 rows), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'path':<22}{'ms/token @' + str(POSITIONS[0]):>16}{'ms/token @' + str(POSITIONS[1]):>16}{'ratio':>8}")
    for name in ("simba step", "transformer kv cache", "simba recompute"):
        a, b = rows[(name, POSITIONS[0])], rows[(name, POSITIONS[1])]
        print(f"{name:<22}{a * 1e3:>16.2f}{b * 1e3:>16.2f}{b / a:>8.2f}")
    print(f"generate {N_FRAMES} frames: SiMBA step {gen_simba:.1f} s (measured), "
          f"recompute {gen_recompute:.1f} s (integrated from measured forwards)")  # fmt: skip

    result = {
        "simba_flatness": rows[("simba step", POSITIONS[1])] / rows[("simba step", POSITIONS[0])],
        "transformer_flatness": rows[("transformer kv cache", POSITIONS[1])]
        / rows[("transformer kv cache", POSITIONS[0])],
        "speedup_vs_recompute_862": gen_recompute / gen_simba,
        "simba_ms_per_token": rows[("simba step", POSITIONS[0])] * 1e3,
        "generate_862_simba_s": gen_simba,
        "generate_862_recompute_s": gen_recompute,
    }
    print(f"simba_flatness {result['simba_flatness']:.3f} (target <= 1.1), "
          f"speedup_vs_recompute_862 {result['speedup_vs_recompute_862']:.0f}x (target >= 100)")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
