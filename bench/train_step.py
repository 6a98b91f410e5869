"""Training-step throughput: SiMBA vs the Cross Transformer, forward + backward + AdamW, side by side.

What is measured, per decoder and sequence length: one optimizer step as `pipelines/train/loop.py` takes it,
built from the project's own pieces: `modeling.builders.build_model`, the model's teacher-forced forward with
`targets=` (label smoothing 0.1, the paper's), `loss.backward()`, then `pipelines.train.optim.clip_and_step`
(gradient clipping 1.0 + AdamW from `make_optimizer`, the paper's parameter groups, + the schedule step).
fp32 on the CPU; bf16 autocast on CUDA (`optim.autocast_dtype`, as the loop does). Batch `--batch` (1),
sequences of 512, 1024, 2588 (the paper's 30 s clips) and 8192 tokens, random tokens and random float text
embeddings of 32 caption tokens (SiMBA prepends them: it runs 32 more positions than the Transformer).

The models are a mid size, `MID` below: bench/generate.py's width (d_model 512, MLP 1024, d_state 128) with
6 layers instead of 12, so that every length, 8192 included, fits a ~3 minute run on 2 idle CPU cores (there a
6-layer step at 8192 takes ~15 s for either decoder, and SiMBA's pure-PyTorch scan peaks at ~6 GB; 12 layers
would double both). Dropout is 0.

Reported:
- tokens/s: batch x length / median step time (audio tokens; SiMBA's caption prefix is not counted), and the
  ratio SiMBA / Transformer at each length.
- MFU: achieved FLOP/s over the machine's matmul FLOP/s. Achieved = batch x positions x training FLOPs per
  position / step time, where training FLOPs are 3 x `modeling.summary.forward_flops_per_token` (the estimate
  `simba-ttm info` reports) and positions are what the decoder runs (length, + 32 for SiMBA's prefix, as
  `summarize` counts them). The matmul FLOP/s is a square torch.mm in the step's compute dtype (fp32 on the
  CPU, bf16 on CUDA), measured in every round of the run (median of all), so a busy machine slows both.
- length exponent: least-squares slope of log(step time) vs log(length) per decoder (1: linear; attention's
  quadratic terms push it towards 2 as they come to dominate).
- peak memory per token. CPU: the process's resident-set high-water mark (VmHWM of /proc/self/status) during
  one step, minus the resident set just before it; before the step glibc's malloc_trim returns freed heap
  pages to the system and writing 5 to /proc/self/clear_refs resets the high-water mark to the current
  resident set. (torch's CPU allocator does not cache, so this sees every allocation of the step.) CUDA:
  torch.cuda.max_memory_allocated minus memory_allocated before the step. The step's peak includes the
  gradients (4 B/parameter, set to None between steps as in the loop), so the per-token figure falls with
  length; `*_mem_bytes_per_token` is the least-squares slope of peak growth vs tokens, which excludes them.

Every round runs each (length, decoder) once, alternating which decoder goes first; the first round is the
warm-up (and the memory measurement) and is not timed.
Results use the median over the timed rounds; the `*_best` keys use each step's fastest round and the fastest
matmul instead: other load on a shared machine only ever adds time, so when the two disagree the machine was
busy (the load average before and after is printed too).

    python bench/train_step.py [--json] [--quick] [--repeats 3] [--batch 1] [--layers 6] [--chunk-size 256]
                               [--threads N]
    python bench/train_step.py --profile [--json]     # torch.profiler over SiMBA steps at 2588 tokens
    python bench/train_step.py --paper --batch 4 [--profile]   # the paper's size, on a GPU

`--quick` (~1 minute): lengths 512, 1024, 2588 and 2 timed rounds. `--profile` runs no benchmark: it prints the
ops of a few SiMBA training steps at 2588 tokens by self CPU time (what bounds the MFU).

Target (issue 9): simba_mfu_2588 >= 0.4 on the pure-PyTorch path. Ratios are measured side by side in one run;
absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import ExperimentConfig, ModelConfig, TrainConfig  # noqa: E402
from modeling.builders import build_model  # noqa: E402
from modeling.compiled import cpu_name  # noqa: E402
from modeling.lm import TextToMusicLM  # noqa: E402
from modeling.summary import forward_flops_per_token  # noqa: E402
from pipelines.train.optim import autocast_dtype, clip_and_step, make_optimizer  # noqa: E402
from pipelines.train.progress import matmul_seconds  # noqa: E402

# bench/generate.py's MID width, 6 layers (see the docstring).
MID = dict(d_model=512, n_layers=6, mlp_dim=1024, n_heads=8, d_state=128, headdim=64, chunk_size=256, dropout=0.0)
TEXT_LEN = 32
LENGTHS = (512, 1024, 2588, 8192)
QUICK_LENGTHS = (512, 1024, 2588)
KEY_LENGTH = 2588
ARCHS = ("simba", "transformer")
TARGET_MFU = 0.4
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")


# --------------------------------------------------------------------------------------------------- machine


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(device: torch.device) -> int:
    """Square matmul size that runs near the device's peak: 2048 saturates a CPU, a GPU needs more."""
    return 8192 if device.type == "cuda" else 2048


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n torch.mm in `dtype`: the best the machine does on dense matmuls (median)."""
    n = matmul_size(device)
    times = list(itertools.islice(matmul_seconds(device, dtype, n), repeats))
    return 2 * n**3 / statistics.median(times)


class PeakMemory:
    """Peak memory growth of one step: RSS high-water mark on the CPU, the caching allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
        self._libc = None
        self._base = 0
        if device.type == "cuda":
            return
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._clear_refs()
            self.method = "VmHWM - VmRSS before the step (malloc_trim, then clear_refs 5 resets VmHWM)"
        except OSError as e:  # no glibc, or no writable /proc/self/clear_refs: peak memory is not reported
            self.method = f"unavailable ({e})"
            self._libc = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self._libc is not None

    @staticmethod
    def _clear_refs() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._libc is not None:
            self._libc.malloc_trim(0)
            self._clear_refs()
            self._base = self._status("VmRSS")

    def peak_growth(self) -> int | None:
        """Bytes above the resident (allocated) memory at `start`, at the highest point since."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self._libc is None:
            return None
        return self._status("VmHWM") - self._base


# --------------------------------------------------------------------------------------------------- training


class Trainee:
    """One decoder with its optimizer, stepping the way the training loop does."""

    def __init__(self, arch: str, model_kwargs: dict, device: torch.device):
        self.arch = arch
        self.cfg = ExperimentConfig(name=f"bench-{arch}", model=ModelConfig(arch=arch, **model_kwargs))
        self.train_cfg = TrainConfig()
        torch.manual_seed(0)
        self.model: TextToMusicLM = build_model(self.cfg.model).to(device).train()
        self.opt, self.sched = make_optimizer(self.model, self.train_cfg)
        self.device = device
        self.amp = autocast_dtype(self.train_cfg, device)
        self.params = sum(p.numel() for p in self.model.parameters())

    def positions(self, length: int) -> int:
        """Positions the decoder runs per sample: SiMBA's caption prefix is part of its sequence."""
        return length + (TEXT_LEN if self.arch == "simba" else 0)

    def train_flops_per_position(self, length: int) -> float:
        return 3 * forward_flops_per_token(self.cfg, self.model, self.positions(length), TEXT_LEN)

    def batch(self, batch_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        pad = self.model.pad_id
        tokens = torch.randint(0, pad, (batch_size, length + 1), generator=g)
        tokens[:, 0] = pad  # BOS
        text = torch.randn(batch_size, TEXT_LEN, self.cfg.model.text_dim, generator=g)
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "text": text,
            "text_mask": torch.ones(batch_size, TEXT_LEN, dtype=torch.bool),
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(
                batch["inputs"],
                batch["text"],
                batch["text_mask"],
                targets=batch["targets"],
                label_smoothing=self.train_cfg.label_smoothing,
            )
        out.loss.backward()
        clip_and_step(self.model.parameters(), self.opt, self.sched, self.train_cfg.grad_clip)
        sync(self.device)

    def timed_step(self, batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        self.step(batch)
        return time.perf_counter() - t0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------------------- profile


def profile(model_kwargs: dict, device: torch.device, batch_size: int, steps: int, top: int) -> dict:
    """torch.profiler over `steps` SiMBA training steps at KEY_LENGTH; prints the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainee = Trainee("simba", model_kwargs, device)
    batch = trainee.batch(batch_size, KEY_LENGTH)
    trainee.step(batch)  # warm-up, outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            trainee.step(batch)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"SiMBA {describe(model_kwargs)}, batch {batch_size} x {KEY_LENGTH} tokens (+{TEXT_LEN} prefix), "
          f"{steps} profiled steps, {wall:.2f} s/step under the profiler, {device_name(device)}")  # fmt: skip
    print(events.table(sort_by=sort_by, row_limit=top, max_name_column_width=48))
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    shares = [e.self_cpu_time_total / total for e in ranked]
    matmul_share = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total
    print(f"matmul ops ({', '.join(MATMUL_OPS)}): {matmul_share:.1%} of self CPU time; the rest is elementwise, "
          f"layout (copy_), scan (cumsum) and reduction work")  # fmt: skip
    return {
        "profile_length": KEY_LENGTH,
        "profile_steps": steps,
        "profile_s_per_step": wall,
        "matmul_share": matmul_share,
        "top_self_cpu": [
            {"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6 / steps, "share": share}
            for e, share in zip(ranked, shares, strict=True)
        ],
    }


def describe(kw: dict) -> str:
    return (
        f"d_model {kw['d_model']} x {kw['n_layers']} layers, MLP {kw['mlp_dim']}, d_state {kw['d_state']}, "
        f"headdim {kw['headdim']}, chunk {kw['chunk_size']}, {kw['n_heads']} attention heads, dropout {kw['dropout']}"
    )


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--quick", action="store_true", help="lengths up to 2588 and 2 timed rounds (~1 minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the size's, MID 6, paper 24)")
    parser.add_argument("--chunk-size", type=int, default=None, help="SiMBA's SSD chunk length (default: the size's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="only profile SiMBA steps at 2588 tokens")
    parser.add_argument("--paper", action="store_true", help="the paper's model size (dropout 0) instead of MID")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=20, help="ops listed by --profile")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else 2 if args.quick else 3
    if min(repeats, args.batch, *(v for v in (args.layers, args.chunk_size) if v is not None)) < 1:
        parser.error("--repeats, --batch, --layers and --chunk-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_kwargs = dict(MID)
    if args.paper:  # ModelConfig's defaults are the paper's (tests/configs/test_config.py checks paper.yaml)
        model_kwargs = {key: getattr(ModelConfig(), key) for key in MID} | {"dropout": 0.0}
    model_kwargs |= {k: v for k, v in (("n_layers", args.layers), ("chunk_size", args.chunk_size)) if v is not None}

    if args.profile:
        result = profile(model_kwargs, device, args.batch, args.profile_steps, args.top)
        if args.json:
            print(json.dumps(result))
        return 0

    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    load_before = load_average()
    trainees = {arch: Trainee(arch, model_kwargs, device) for arch in ARCHS}
    compute_dtype = trainees["simba"].amp or torch.float32
    memory = PeakMemory(device)
    batches = {(arch, n): trainees[arch].batch(args.batch, n, seed=n) for arch in ARCHS for n in lengths}
    for trainee in trainees.values():
        trainee.step(trainee.batch(1, 64))  # first-call work and AdamW's moments, before any measurement

    times: dict[tuple[str, int], list[float]] = {key: [] for key in batches}
    peak: dict[tuple[str, int], int | None] = {}
    matmul: list[float] = []
    for round_ in range(repeats + 1):
        matmul.append(matmul_flops(device, compute_dtype))
        order = ARCHS if round_ % 2 == 0 else ARCHS[::-1]
        for n in lengths:
            for arch in order:
                if round_ == 0:  # warm-up round: measures memory, not time
                    memory.start()
                    trainees[arch].step(batches[(arch, n)])
                    peak[(arch, n)] = memory.peak_growth()
                else:
                    times[(arch, n)].append(trainees[arch].timed_step(batches[(arch, n)]))
    load_after = load_average()

    peak_flops = statistics.median(matmul)
    rows = {}
    for (arch, n), ts in times.items():
        t = trainees[arch]
        step_s = statistics.median(ts)
        work = args.batch * t.positions(n) * t.train_flops_per_position(n)  # FLOPs of one step
        mem = peak[(arch, n)]
        rows[(arch, n)] = dict(
            step_s=step_s,
            best_s=min(ts),
            tokens_per_s=args.batch * n / step_s,
            flops=work / step_s,
            mfu=work / step_s / peak_flops,
            mfu_best=work / min(ts) / max(matmul),
            peak_bytes=mem,
            peak_bytes_per_token=None if mem is None else mem / (args.batch * n),
        )
    speedup = {n: rows[("transformer", n)]["step_s"] / rows[("simba", n)]["step_s"] for n in lengths}
    speedup_best = {n: rows[("transformer", n)]["best_s"] / rows[("simba", n)]["best_s"] for n in lengths}
    exponents = {
        arch: slope([math.log(n) for n in lengths], [math.log(rows[(arch, n)]["step_s"]) for n in lengths])
        for arch in ARCHS
    }
    mem_slope = {
        arch: slope([args.batch * n for n in lengths], [rows[(arch, n)]["peak_bytes"] for n in lengths])
        if memory.available
        else None
        for arch in ARCHS
    }

    params = {arch: trainees[arch].params for arch in ARCHS}
    print(f"device: {device_name(device)}; compute {str(compute_dtype).removeprefix('torch.')}; "
          f"matmul {peak_flops / 1e9:.1f} GFLOP/s ({matmul_size(device)}^3 torch.mm, median of {len(matmul)} rounds: "
          f"{min(matmul) / 1e9:.1f}..{max(matmul) / 1e9:.1f})")  # fmt: skip
    print(f"mid size: {describe(model_kwargs)}; SiMBA {params['simba'] / 1e6:.1f}M, Transformer "
          f"{params['transformer'] / 1e6:.1f}M parameters; batch {args.batch}, caption {TEXT_LEN} tokens")  # fmt: skip
    print(f"one step = forward + backward + clip + AdamW; median of {repeats} rounds after 1 warm-up round; "
          f"load average {load_before} before, {load_after} after")  # fmt: skip
    print(f"peak memory: {memory.method}")
    header = f"{'length':>7} {'decoder':<12}{'s/step':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}"
    print(header + f"{'KiB/token':>11}{'SiMBA/Tr':>10}")
    for n in lengths:
        for arch in ARCHS:
            r = rows[(arch, n)]
            mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            per_token = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes_per_token'] / 1024:.0f}"
            ratio = f"{speedup[n]:.2f}" if arch == "simba" else ""
            print(f"{n:>7} {arch:<12}{r['step_s']:>8.2f}{r['tokens_per_s']:>10.0f}{r['flops'] / 1e9:>9.1f}"
                  f"{r['mfu']:>7.3f}{mem:>10}{per_token:>11}{ratio:>10}")  # fmt: skip
    for arch in ARCHS:
        mem = "" if mem_slope[arch] is None else f", peak memory {mem_slope[arch] / 1024:.0f} KiB/token (slope)"
        print(f"{arch}: step time ~ length^{exponents[arch]:.2f} over {lengths[0]}..{lengths[-1]}{mem}")

    result = {
        "simba_mfu_2588": rows[("simba", KEY_LENGTH)]["mfu"],
        "transformer_mfu_2588": rows[("transformer", KEY_LENGTH)]["mfu"],
        "simba_over_transformer_2588": speedup[KEY_LENGTH],
        "simba_mfu_2588_best": rows[("simba", KEY_LENGTH)]["mfu_best"],
        "transformer_mfu_2588_best": rows[("transformer", KEY_LENGTH)]["mfu_best"],
        "simba_over_transformer_2588_best": speedup_best[KEY_LENGTH],
        "simba_len_exponent": exponents["simba"],
        "transformer_len_exponent": exponents["transformer"],
        "simba_mem_bytes_per_token": mem_slope["simba"],
        "transformer_mem_bytes_per_token": mem_slope["transformer"],
        "matmul_flops": peak_flops,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": device_name(device),
        "cpu_model": cpu_name(),
        "threads": torch.get_num_threads(),
        "model": model_kwargs,
        "params": params,
        "batch": args.batch,
        "text_len": TEXT_LEN,
        "repeats": repeats,
        "lengths": list(lengths),
        "memory_method": memory.method,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    for (arch, n), r in rows.items():
        result[f"{arch}_step_s_{n}"] = r["step_s"]
        result[f"{arch}_tokens_per_s_{n}"] = r["tokens_per_s"]
        result[f"{arch}_mfu_{n}"] = r["mfu"]
        result[f"{arch}_peak_bytes_per_token_{n}"] = r["peak_bytes_per_token"]
    result.update({f"simba_over_transformer_{n}": speedup[n] for n in lengths})
    print(f"best rounds (other load only adds time): simba_mfu_2588 {result['simba_mfu_2588_best']:.3f}, "
          f"transformer_mfu_2588 {result['transformer_mfu_2588_best']:.3f}, simba_over_transformer_2588 "
          f"{result['simba_over_transformer_2588_best']:.2f}")  # fmt: skip
    print(f"simba_mfu_2588 {result['simba_mfu_2588']:.3f} (target >= {TARGET_MFU}), transformer_mfu_2588 "
          f"{result['transformer_mfu_2588']:.3f}, simba_over_transformer_2588 "
          f"{result['simba_over_transformer_2588']:.2f}")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
