"""What rank 0 prints every `train.log_every` steps: step / max_steps, loss, lr, tokens/s, MFU and ETA.

MFU (model FLOPs utilisation) = achieved training FLOP/s / peak FLOP/s of the workers. The FLOPs per target
token are the analytic estimate `simba-ttm info` reports (`modeling.summary`, training = 3 x forward, at the
configured clip length). The peak is `train.peak_tflops` when set, else the datasheet dense bf16 figure of a
known GPU when training in bf16, else a matmul measured on the worker's device in its training dtype (so on a
CPU, MFU is relative to what this machine's matmul reaches, not to a nominal figure).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from configs.schema import ExperimentConfig
from modeling.lm import TextToMusicLM
from modeling.summary import TYPICAL_TEXT_LEN, forward_flops_per_token

# Dense bf16 tensor-core TFLOP/s with fp32 accumulation (vendor datasheets); the first substring match wins.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def train_flops_per_token(cfg: ExperimentConfig, model: TextToMusicLM) -> float:
    """Forward + backward FLOPs per target token at the configured clip length (3 x the forward estimate)."""
    prefix = TYPICAL_TEXT_LEN if cfg.model.arch == "simba" else 0  # SiMBA runs over the text prefix too
    return 3.0 * forward_flops_per_token(cfg, model, cfg.data.max_frames + 1 + prefix, TYPICAL_TEXT_LEN)


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int) -> Iterator[float]:
    """Wall times of successive n x n x n matmuls on `device` in `dtype`, after one untimed warm-up.

    The one matmul measurement behind both the workers' MFU (`measured_matmul_flops`) and bench/train_step.py;
    each caller decides how many to take and how to summarise them (2 n^3 / time is the FLOP/s).
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        yield time.perf_counter() - t0


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`, best of repeated timings for about `seconds`."""
    n = 4096 if device.type == "cuda" else 1024
    deadline = time.perf_counter() + seconds
    best = float("inf")
    for k, elapsed in enumerate(matmul_seconds(device, dtype, n), 1):
        best = min(best, elapsed)
        if k >= 99 or (k >= 2 and time.perf_counter() > deadline):
            break
    return 2.0 * n**3 / best


def peak_flops(cfg: ExperimentConfig, device: torch.device, amp: torch.dtype | None) -> tuple[float, str]:
    """(peak FLOP/s of one worker, where the figure comes from)."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda" and amp == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12, f"datasheet bf16 ({name})"
    dtype = amp or torch.float32
    return measured_matmul_flops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul ({device.type})"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """MFU for every step's metrics; a readable line every `log_every` steps with the ETA."""

    def __init__(self, name: str, max_steps: int, flops_per_token: float, peak_flops_total: float, start_step: int):
        self.name = name  # the run's name starts each line: runs side by side (the demo, a sweep) stay apart
        self.max_steps = max_steps
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.mark = (start_step, time.perf_counter())

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak

    def line(self, step: int, metrics: dict) -> str:
        """The progress line at `step`; the ETA extrapolates the wall time per step since the last line."""
        last_step, last_time = self.mark
        now = time.perf_counter()
        self.mark = (step, now)
        per_step = (now - last_time) / max(step - last_step, 1)
        parts = [
            f"step {step}/{self.max_steps}",
            f"loss {metrics['train_loss']:.4f}",
            f"lr {metrics['lr']:.2e}",
            f"{metrics['tokens_per_s']:,.0f} tok/s",
            f"MFU {100 * metrics['mfu']:.1f}%",
            f"ETA {_duration(per_step * (self.max_steps - step))}",
        ]
        if "val_loss" in metrics:
            parts.insert(2, f"val {metrics['val_loss']:.4f}")
        return f"[{self.name}] " + " | ".join(parts)
