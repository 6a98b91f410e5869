"""Decode speed on the CPU: SiMBA's recurrent step vs the Transformer's KV cache vs full recomputation.

Per-token decode time is measured at two positions (~100 and ~2500 tokens already generated), batch 1
with classifier-free guidance (cond + uncond = 2 rows), on a mid-size configuration of each decoder:

- simba step:        one O(1) recurrent step (conv + SSM state per layer), eager PyTorch
- simba step (comp): the same step through `modeling.compiled.compiled_step` (what `generation.compile` uses),
                     with the weight-product strategy it chose on this machine (`--strategy` forces one)
- transformer cache: one KV-cache step (attention over all cached positions)
- recompute:         one full forward over the whole sequence, eager, what the paper's public code does per token

Then the time to generate 862 frames (10 s) is measured end to end for both SiMBA step paths (the compiled
one after its one-off compilation, which is reported on its own, as the median of GENERATE_RUNS generations),
and estimated for the recompute path by
integrating measured full-forward times over sequence lengths 1..862 (trapezoid over several measured
lengths: running it for real would take many minutes).

A decoding step of this size streams every weight and the SSM state through the CPU once, so its floor is
set by memory bandwidth. The bench measures the machine's read bandwidth (a sum over a buffer far larger than
any cache, with the step's thread count) and reports the bandwidth limit fraction: (weight + state bytes
read per token) / bandwidth / measured step time, 1.0 being a step that only streams its data. The compiled step
puts its weights and state on 2 MiB pages (`modeling.pages`: with 4 KiB pages a stream pays a TLB miss per page,
more under a hypervisor), so its bandwidth is read from a buffer on huge pages too: both its speed and its limit
rise. The same step on a copy of the weights left on 4 KiB pages is measured beside it, against a 4 KiB-page
buffer, and the ratio of the two is printed (`huge_pages_speedup`). Weights count
every parameter the step touches (the text projection is prefill-only; the token embedding contributes the
rows looked up); the state counts once (read); a step also writes it back, which `_rw` counts too. Bandwidth
and step time are measured alternately in rounds, and the fraction is the median of the per-round fractions.
To tell what keeps a step from its limit, the same graph at width 64 (NARROW) is timed in the same rounds: its
step streams next to nothing, so its time is a step's fixed cost (the Python call, dynamo's guards for inductor's
strategies, one barrier per parallel loop, and the per-row work of the norms, activations and SSM heads), and the
rest of the mid-size step is streaming (`streaming_gbps`).

    python bench/generate.py [--json] [--repeats 5] [--strategy auto|reduce|gemm|fused] [--compiled-baseline]

`--strategy` forces the compiled step's weight-product strategy (default: `SIMBA_DECODE_STRATEGY`, else auto:
time all and keep the fastest, as generation does). `--compiled-baseline` also times one recompute forward at
862 tokens under default torch.compile, to show how much of the speed-up a compiled baseline would take back.

Targets (issues 2 and 10): simba_flatness <= 1.1, speedup_vs_recompute_862 >= 100, bandwidth_limit_fraction
>= 0.7 (on AMD Zen 4 and on Intel Xeon alike). Ratios are measured side by side in one run; absolute times
depend on the machine, and the load average before and after is printed (others may share it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import load_average  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402
from modeling.builders import build_model  # noqa: E402
from modeling.compiled import STRATEGIES, STRATEGY_ENV, StepFn, compiled_step, cpu_name  # noqa: E402
from modeling.layers import state_tensors  # noqa: E402
from modeling.lm import TextToMusicLM, with_null_condition  # noqa: E402
from modeling.pages import huge_pages_off, use_huge_pages  # noqa: E402

# Mid-size: a quarter of the paper's width budget, so the recompute baseline stays measurable on 2 cores.
MID = dict(d_model=512, n_layers=12, mlp_dim=1024, n_heads=8, d_state=128, headdim=64, chunk_size=256, dropout=0.0)
TEXT_LEN = 32
N_FRAMES = 862
POSITIONS = (100, 2500)
ROWS = 2  # batch 1 + CFG
# The same depth and graph at a width where streaming costs nothing: its step time is a step's fixed cost.
NARROW = dict(MID, d_model=64, mlp_dim=128, d_state=16, headdim=16, n_heads=4)
BANDWIDTH_BUFFER_BYTES = 1 << 30  # far beyond any L3 here (32 MiB per Zen 4 CCD; Xeons up to ~100 MiB)
TARGET_FRACTION = 0.7
GENERATE_RUNS = 3  # whole compiled generations timed for the speed-up over recompute
SETTLE_CALLS = 3  # untimed steps after each bandwidth measurement (see bandwidth_rounds)


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
def step_times(model: TextToMusicLM, repeats: int, step=None, huge_pages: bool = True) -> dict[int, float]:
    """Seconds for one cached decoding step after each of POSITIONS tokens (`step`: default model.step), with the
    state on huge pages as generation allocates it, or (`huge_pages=False`) on 4 KiB pages. The positions are timed
    one call each in turn, so that the machine's drift (other load, its memory bandwidth) reaches both alike: their
    ratio is the flatness."""
    step = step or model.step
    calls = []
    for position in POSITIONS:
        tokens, text, mask = _inputs(model, position)
        with contextlib.nullcontext() if huge_pages else huge_pages_off():
            _, state = model.prefill(tokens, text, mask, max_len=position + repeats + 8)
        # Each call advances the state by one position: fine for timing (a few positions past `position`).
        calls.append(functools.partial(step, tokens[:, -1], state))
    times: list[list[float]] = [[] for _ in POSITIONS]
    for round_ in range(repeats + 2):
        for call, seconds in zip(calls, times, strict=True):
            t0 = time.perf_counter()
            call()
            if round_ >= 2:  # two warm-up rounds
                seconds.append(time.perf_counter() - t0)
    return {position: statistics.median(seconds) for position, seconds in zip(POSITIONS, times, strict=True)}


@torch.no_grad()
def compile_time(model: TextToMusicLM, step) -> float:
    """Seconds of the compiled step's first call (compilation, and with `auto` the timing of both strategies)."""
    tokens, text, mask = _inputs(model, 4)
    _, state = model.prefill(tokens, text, mask, max_len=8)
    t0 = time.perf_counter()
    step(tokens[:, -1], state)
    return time.perf_counter() - t0


def step_bytes(model: TextToMusicLM, rows: int) -> tuple[int, int]:
    """(weight bytes, state bytes) one decoding step of `rows` rows reads."""
    skip = {id(p) for p in model.text_proj.parameters()} | {id(model.token_emb.weight)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    weights += rows * model.token_emb.weight[0].numel() * model.token_emb.weight.element_size()
    return weights, sum(t.numel() * t.element_size() for t in state_tensors(model.allocate_state(rows, 1)))


def page_setup() -> str:
    """Transparent huge pages as the kernel and torch's allocator use them: 4 KiB pages cost a TLB miss per page
    on a stream (more under a hypervisor), so both the step and the bandwidth depend on them."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        mode = "n/a"
    return f"THP {mode}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


@dataclasses.dataclass
class PagedStep:
    """A compiled step and the read bandwidth it is measured against, with huge pages or without."""

    model: TextToMusicLM
    step: StepFn
    huge_pages: bool
    measure_bandwidth: bool = True
    bandwidth: list[float] = dataclasses.field(default_factory=list)  # bytes/s, per round
    seconds: list[float] = dataclasses.field(default_factory=list)  # per step, per round


@torch.no_grad()
def bandwidth_rounds(variants: list[PagedStep], rounds: int, calls: int = 10) -> None:
    """Read bandwidth and seconds per step (ROWS rows) of each variant, measured alternately `rounds` times.

    Bandwidth is one `sum` over an fp32 buffer of BANDWIDTH_BUFFER_BYTES with torch's threads (a pure read
    stream), on the pages its step uses: put on huge pages (`modeling.pages`) for a step that uses them, the
    allocator's 4 KiB pages otherwise. Alternating lets a burst of load from another process slow all alike.
    After that stream the next few steps are slower than a generation's back-to-back steps (on the AMD VMs here
    the first three took 10-15% longer than the seven after them), so SETTLE_CALLS untimed steps precede the
    `calls` timed ones.
    """
    setups = []
    for variant in variants:
        tokens, text, mask = _inputs(variant.model, POSITIONS[0])
        with contextlib.nullcontext() if variant.huge_pages else huge_pages_off():  # the state's pages
            max_len = POSITIONS[0] + rounds * (SETTLE_CALLS + calls) + 8
            _, state = variant.model.prefill(tokens, text, mask, max_len=max_len)
        buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4 if variant.measure_bandwidth else 1)  # first touch
        if variant.huge_pages:
            use_huge_pages([buffer])
        buffer.sum()
        variant.step(tokens[:, -1], state)
        setups.append((buffer, tokens[:, -1], state))
    for _ in range(rounds):
        for variant, (buffer, token, state) in zip(variants, setups, strict=True):
            if variant.measure_bandwidth:
                t0 = time.perf_counter()
                buffer.sum()
                variant.bandwidth.append(BANDWIDTH_BUFFER_BYTES / (time.perf_counter() - t0))
            for _ in range(SETTLE_CALLS):
                variant.step(token, state)
            t0 = time.perf_counter()
            for _ in range(calls):
                variant.step(token, state)
            variant.seconds.append((time.perf_counter() - t0) / calls)


def limit_fraction(variant: PagedStep, moved: int) -> float:
    """Median over rounds of (bytes moved / that round's bandwidth) / that round's step time."""
    return statistics.median(moved / bw / t for bw, t in zip(variant.bandwidth, variant.seconds, strict=True))


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
    parser.add_argument("--strategy", choices=("auto", *STRATEGIES), default=None,
                        help=f"compiled step's weight products (default: ${STRATEGY_ENV}, else auto)")  # fmt: skip
    parser.add_argument("--compiled-baseline", action="store_true", help="also time a compiled recompute forward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.strategy:  # generate(compile=True) below reads it too
        os.environ[STRATEGY_ENV] = args.strategy
    load_before = load_average()
    torch.manual_seed(0)
    simba = build_model(ModelConfig(arch="simba", **MID)).eval()
    transformer = build_model(ModelConfig(arch="transformer", **MID)).eval()
    # The same weights in memory that nothing puts on huge pages (copied before anything does): the A/B of pages.
    simba_small_pages = copy.deepcopy(simba)

    fast_step = compiled_step(simba)
    compile_s = compile_time(simba, fast_step)
    # The eager step comes back where inductor cannot build kernels (compiled_step warned why).
    choice = fast_step.choice(ROWS) if hasattr(fast_step, "choice") else None
    huge = PagedStep(simba, fast_step, huge_pages=True)
    small = PagedStep(simba_small_pages, simba_small_pages.step, huge_pages=False)
    variants = [huge, small]
    if choice is not None:
        with huge_pages_off():  # its page size is part of the choice it keeps
            small.step = compiled_step(simba_small_pages, choice.strategy)
        # The step's fixed cost (Python call, guards, one barrier per parallel loop): the same graph at width 64.
        narrow_model = build_model(ModelConfig(arch="simba", **NARROW)).eval()
        narrow = PagedStep(narrow_model, compiled_step(narrow_model, choice.strategy), True, measure_bandwidth=False)
        compile_time(narrow_model, narrow.step)
        variants.append(narrow)
    bandwidth_rounds(variants, args.repeats * 2)
    weight_bytes, state_bytes = step_bytes(simba, ROWS)
    timed = {
        "simba step": step_times(simba, args.repeats * 4),
        "simba step (compiled)": step_times(simba, args.repeats * 4, fast_step),
        "  on 4 KiB pages": step_times(simba_small_pages, args.repeats * 4, small.step, False),
        "transformer kv cache": step_times(transformer, args.repeats * 4),
        "simba recompute": {pos: recompute_time(simba, pos, args.repeats) for pos in POSITIONS},
    }
    rows = {(name, pos): seconds[pos] for name, seconds in timed.items() for pos in POSITIONS}

    gen_simba = generate_time(simba, N_FRAMES)
    # The headline's numerator: the median of GENERATE_RUNS whole generations (one run is a single ~5 s sample).
    gen_compiled_runs = [generate_time(simba, N_FRAMES, compile=True) for _ in range(GENERATE_RUNS)]
    gen_compiled = statistics.median(gen_compiled_runs)
    gen_recompute = recompute_total(simba, N_FRAMES, args.repeats)
    baseline_ratio = compiled_recompute_ratio(simba, N_FRAMES, args.repeats) if args.compiled_baseline else None
    load_after = load_average()

    n_params = sum(p.numel() for p in simba.parameters())
    print(f"cpu: {cpu_name()}, {torch.get_num_threads()} threads; load average {load_before} before, "
          f"{load_after} after")  # fmt: skip
    print(f"mid-size config: {MID}, SiMBA {n_params / 1e6:.1f}M params, batch 1 + CFG ({ROWS} rows); "
          f"pages: {page_setup()}")  # fmt: skip
    print(f"{'path':<24}{'ms/token @' + str(POSITIONS[0]):>16}{'ms/token @' + str(POSITIONS[1]):>16}{'ratio':>8}")
    for name in ("simba step", "simba step (compiled)", "  on 4 KiB pages", "transformer kv cache", "simba recompute"):
        a, b = rows[(name, POSITIONS[0])], rows[(name, POSITIONS[1])]
        print(f"{name:<24}{a * 1e3:>16.2f}{b * 1e3:>16.2f}{b / a:>8.2f}")
    print(f"compiling the SiMBA step took {compile_s:.1f} s (once per process, model and batch size)")
    if choice is None:
        strategy, reason, strategy_ms = "eager", "not compiled on this machine", {}
    else:
        strategy, reason, strategy_ms = choice.strategy, choice.reason, choice.ms_per_step
    timed = ", ".join(f"{s} {ms:.2f}" for s, ms in strategy_ms.items())
    print(f"compiled step strategy: {strategy} ({reason}{'; ms/step ' + timed if timed else ''})")
    # Bandwidth limit fraction = (bytes / bandwidth) / step time, per alternated round (the machine's bandwidth
    # drifts with other load), median over rounds; and from the best round of each (other load only ever adds
    # time). The headline counts the state once, as read; a step also writes it back (`_rw`). Each step is held
    # to the bandwidth of its own page size: huge pages raise both the step's speed and its limit.
    pages = use_huge_pages(simba.parameters())  # prefill did it: this only reports the weights' regions
    print(f"huge pages for the weights: {pages}")
    moved = weight_bytes + state_bytes
    fraction = limit_fraction(huge, moved)
    fraction_small = limit_fraction(small, moved)
    fraction_rw = fraction * (moved + state_bytes) / moved
    fraction_best = moved / max(huge.bandwidth) / min(huge.seconds)
    bw, bw_small = statistics.median(huge.bandwidth), statistics.median(small.bandwidth)
    fraction_eager = moved / bw_small / rows[("simba step", POSITIONS[0])]
    huge_pages_speedup = statistics.median(s / h for s, h in zip(small.seconds, huge.seconds, strict=True))
    print(f"bandwidth limit: weights {weight_bytes / 1e6:.1f} MB + state {state_bytes / 1e6:.1f} MB per token / "
          f"read bandwidth on huge pages {bw / 1e9:.1f} GB/s (median of {len(huge.bandwidth)} rounds; best "
          f"{max(huge.bandwidth) / 1e9:.1f}) = {moved / bw * 1e3:.2f} ms/token; on 4 KiB pages "
          f"{bw_small / 1e9:.1f} GB/s = {moved / bw_small * 1e3:.2f} ms/token")  # fmt: skip
    step_ms = statistics.median(huge.seconds) * 1e3
    print(f"compiled step {step_ms:.2f} ms (median; best {min(huge.seconds) * 1e3:.2f}): bandwidth_limit_fraction "
          f"{fraction:.2f} (median of rounds; target >= {TARGET_FRACTION}), {fraction_rw:.2f} counting the state's "
          f"write-back too, {fraction_best:.2f} from the best rounds")  # fmt: skip
    print(f"on 4 KiB pages: compiled step {statistics.median(small.seconds) * 1e3:.2f} ms, fraction "
          f"{fraction_small:.2f} of its own limit; huge pages make the step {huge_pages_speedup:.2f}x faster "
          f"(median of per-round ratios); eager step {fraction_eager:.2f}")  # fmt: skip
    fixed_ms = statistics.median(narrow.seconds) * 1e3 if choice is not None else float("nan")
    streaming_gbps = moved / (step_ms - fixed_ms) / 1e6
    print(f"fixed cost per step (the same depth at width {NARROW['d_model']}): {fixed_ms:.2f} ms; the rest of the "
          f"step streams weights + state at {streaming_gbps:.1f} GB/s ({streaming_gbps * 1e9 / bw:.2f} of the read "
          f"bandwidth)")  # fmt: skip
    runs = ", ".join(f"{t:.2f}" for t in gen_compiled_runs)
    print(f"generate {N_FRAMES} frames: SiMBA compiled step {gen_compiled:.2f} s (median of {runs}), eager step "
          f"{gen_simba:.1f} s (measured), recompute {gen_recompute:.1f} s (integrated from measured "
          "forwards)")  # fmt: skip
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
        "strategy": strategy,
        "strategy_reason": reason,
        "strategy_ms_per_step": strategy_ms,
        "bandwidth_limit_fraction": fraction,
        "bandwidth_limit_fraction_rw": fraction_rw,
        "bandwidth_limit_fraction_best": fraction_best,
        "bandwidth_limit_fraction_eager": fraction_eager,
        "bandwidth_limit_fraction_small_pages": fraction_small,
        "huge_pages_speedup": huge_pages_speedup,
        "huge_pages": str(pages),
        "read_bandwidth_gbps": bw / 1e9,
        "read_bandwidth_best_gbps": max(huge.bandwidth) / 1e9,
        "read_bandwidth_small_pages_gbps": bw_small / 1e9,
        "fixed_ms_per_step": fixed_ms,
        "streaming_gbps": streaming_gbps,
        "weight_bytes_per_token": weight_bytes,
        "state_bytes_per_token": state_bytes,
        "cpu_model": cpu_name(),
        "threads": torch.get_num_threads(),
        "pages": page_setup(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "generate_862_simba_s": gen_compiled,
        "generate_862_simba_runs_s": gen_compiled_runs,
        "generate_862_simba_eager_s": gen_simba,
        "generate_862_recompute_s": gen_recompute,
    }
    if baseline_ratio is not None:
        result["recompute_eager_over_compiled_862"] = baseline_ratio
    print(f"simba_flatness {result['simba_flatness']:.3f} (target <= 1.1), "
          f"speedup_vs_recompute_862 {result['speedup_vs_recompute_862']:.0f}x (target >= 100; "
          f"eager step {result['speedup_vs_recompute_862_eager']:.0f}x), bandwidth_limit_fraction "
          f"{fraction:.2f} (target >= {TARGET_FRACTION})")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
