"""What only a GPU shows, at the paper's size (`configs/paper.yaml`: 281M-parameter SiMBA, 305M Transformer).

1. Paths agree: SiMBA's mamba_ssm fast path (Triton SSD scan, gated RMSNorm, selective_state_update) against the
   pure-PyTorch path on the same weights: loss, logits and every parameter's gradient of a teacher-forced batch
   (fp32 and bf16 autocast), and decoding: prefill + steps against the full forward's logits at those positions.
2. Training step: the loop's step (forward with label smoothing, backward, clipping, AdamW) in bf16 autocast at
   the paper's micro-batch (4 x 2588 tokens), for SiMBA on each path and the Transformer with SDPA's default
   kernel and with the math kernel: tokens/s, MFU (against a measured bf16 matmul), peak allocated memory (does it
   fit the paper's RTX 3090, 24 GiB?) beside `simba-ttm info`'s estimate of it, and what the paper's schedule
   (85k optimizer steps x 32 micro-batches) would take at that speed.
3. Attention kernels: which SDPA kernels the Transformer's self- and cross-attention dispatch to in training.
4. Decoding: ms per token of SiMBA's step (each path, and the fast one replayed from a CUDA graph) and the
   Transformer's KV-cache step at 100 and 2500 tokens, 2 rows (one caption + CFG) and 64 (an evaluation batch of
   32), in fp32 as `generate` runs on a checkpoint's weights; and `generate` itself (sampling included) per frame.

    python bench/cuda.py [--json] [--quick] [--device cuda|cpu] [--size paper|tiny]

`--device cpu --size tiny` runs every section on the CPU at a tiny size (a dry run of the script; the fast path
and CUDA graphs are then reported as unavailable). Sections that fail report their error and the others go on.
The project calls only mamba_ssm's Triton kernels (`mamba_ssm.ops.triton`) and causal_conv1d's when installed;
`pyproject.toml`'s `cuda` extra says how to install both (mamba_ssm's package also imports its Mamba-1 CUDA
extension, which its install builds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import TEXT_LEN, Trainee, device_name, matmul_flops, sync  # noqa: E402
from configs.schema import ModelConfig, TrainConfig  # noqa: E402
from modeling import mamba2  # noqa: E402
from modeling.builders import build_model  # noqa: E402
from modeling.compiled import cpu_name  # noqa: E402
from modeling.layers import state_tensors  # noqa: E402
from modeling.lm import TextToMusicLM, with_null_condition  # noqa: E402
from modeling.summary import estimate_train_memory  # noqa: E402

SIZES = {
    "paper": {},  # ModelConfig's defaults are the paper's (tests/configs/test_config.py checks paper.yaml)
    "tiny": dict(d_model=64, n_layers=2, mlp_dim=128, n_heads=4, d_state=16, headdim=16, chunk_size=16, text_dim=32),
}
PAPER_OPTIMIZER_STEPS = 85_000
CHECKED_REPLAYS = 5  # graph replays compared with eager steps
GENERATE_FRAMES = 200  # frames per timed generation (10 s are 862): enough to amortise the prefill
RTX_3090_BYTES = 24 * 2**30
GIB = 2**30
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


def set_fast_path(model: torch.nn.Module, fast: bool) -> None:
    for module in model.modules():
        if isinstance(module, mamba2.Mamba2):
            module.use_fast_path = fast


def fast_path_available(device: torch.device) -> bool:
    return device.type == "cuda" and mamba2.mamba_chunk_scan_combined is not None


def paths(device: torch.device) -> list[bool]:
    return [True, False] if fast_path_available(device) else [False]


def path_name(fast: bool) -> str:
    return "fast" if fast else "pure"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def eval_model(arch: str, size: dict, device: torch.device, seed: int = 0) -> TextToMusicLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, **{**size, "dropout": 0.0, "cond_dropout": 0.0})
    return build_model(cfg).to(device).eval()


def inputs(model: TextToMusicLM, rows: int, length: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.pad_id, (rows, length + 1), generator=g)
    tokens[:, 0] = model.pad_id
    text = torch.randn(rows, TEXT_LEN, model.text_dim, generator=g)
    mask = torch.ones(rows, TEXT_LEN, dtype=torch.bool)
    mask[0, TEXT_LEN // 2 :] = False  # one shorter caption: the prefix's left padding is exercised too
    return [t.to(device) for t in (tokens, text, mask)]


# ------------------------------------------------------------------------------------------------ 1. agreement


def teacher_forced(model, tokens, text, mask, amp: torch.dtype | None, fast: bool):
    set_fast_path(model, fast)
    model.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(tokens[:, :-1], text, mask, targets=tokens[:, 1:], label_smoothing=0.1)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), out.logits.detach().float(), grads


@torch.no_grad()
def incremental(model, tokens, text, mask, prompt: int, steps: int, fast: bool) -> tuple[float, float]:
    """Max |step logits - full forward logits| over `steps` steps after a `prompt`-token prefill, and its scale."""
    set_fast_path(model, fast)
    full = model(tokens[:, : prompt + steps], text, mask).logits.float()  # (B, T, V)
    logits, state = model.prefill(tokens[:, :prompt], text, mask, max_len=prompt + steps)
    got = [logits]
    for t in range(prompt, prompt + steps - 1):
        got.append(model.step(tokens[:, t], state))
    got = torch.stack(got, 1).float()
    want = full[:, prompt - 1 : prompt + steps - 1]
    return (got - want).abs().max().item(), want.abs().max().item()


def agreement(device: torch.device, size: dict, quick: bool) -> dict:
    model = eval_model("simba", size, device)
    rows, length = 2, (512 if quick else 1024)
    tokens, text, mask = inputs(model, rows, length, device)
    result: dict = {"rows": rows, "length": length}
    for amp in (None, torch.bfloat16):
        key = "bf16" if amp else "fp32"
        runs = {fast: teacher_forced(model, tokens, text, mask, amp, fast) for fast in paths(device)}
        if len(runs) < 2:
            result[key] = {"pure_loss": runs[False][0], "compared": False}
            continue
        (loss_f, logits_f, grads_f), (loss_p, logits_p, grads_p) = runs[True], runs[False]
        grad_errs = {n: rel_err(grads_f[n], grads_p[n]) for n in grads_p}
        worst = max(grad_errs, key=grad_errs.get)
        result[key] = {
            "fast_loss": loss_f,
            "pure_loss": loss_p,
            "logits_rel_err": rel_err(logits_f, logits_p),
            "grad_rel_err_median": statistics.median(grad_errs.values()),
            "grad_rel_err_max": grad_errs[worst],
            "grad_rel_err_max_param": worst,
        }
    for fast in paths(device):
        err, scale = incremental(model, tokens, text, mask, prompt=200, steps=24, fast=fast)
        result[f"step_vs_forward_{path_name(fast)}"] = {"max_abs_err": err, "logit_scale": scale}
    return result


# ------------------------------------------------------------------------------------------- 2. training step


def train_variant(arch: str, size: dict, device: torch.device, fast: bool, math_sdpa: bool, batch, repeats: int):
    trainee = Trainee(arch, size, device)
    set_fast_path(trainee.model, fast)
    data = trainee.batch(*batch)
    kernel = contextlib.nullcontext()
    if math_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel([SDPBackend.MATH])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with kernel:
        for _ in range(2):  # warm-up: Triton autotuning, cuBLAS heuristics, the optimizer's state
            trainee.step(data)
        times = [trainee.timed_step(data) for _ in range(repeats)]
    seconds = statistics.median(times)
    row = {
        "params": trainee.params,
        "step_s": seconds,
        "tokens_per_s": batch[0] * batch[1] / seconds,
        "flops_per_s": batch[0] * trainee.positions(batch[1]) * trainee.train_flops_per_position(batch[1]) / seconds,
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        if fast or arch != "simba":  # `simba-ttm info`'s estimate, for mamba_ssm's kernels (and bf16 on a GPU)
            # at the trainee's train.batch_size, which `training` measures at
            estimate = estimate_train_memory(trainee.cfg, trainee.params, trainee.positions(batch[1]))
            row["estimated_gib"] = estimate / GIB
    micro_batches = PAPER_OPTIMIZER_STEPS * TrainConfig().grad_accum
    row["paper_schedule_days"] = micro_batches * seconds / 86400
    del trainee, data
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def training(device: torch.device, size: dict, quick: bool) -> dict:
    batch = (TrainConfig().batch_size, 1024 if quick else 2588)
    repeats = 3 if quick else 5
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_flops(device, dtype)
    variants = [(f"simba_{path_name(fast)}", "simba", fast, False) for fast in paths(device)]
    variants += [("transformer_sdpa", "transformer", False, False), ("transformer_math", "transformer", False, True)]
    result: dict = {"batch": batch[0], "length": batch[1], "matmul_tflops": peak / 1e12}
    for name, arch, fast, math_sdpa in variants:
        row = attempt(partial(train_variant, arch, size, device, fast, math_sdpa, batch, repeats))
        if "flops_per_s" in row:
            row["mfu"] = row.pop("flops_per_s") / peak
        if "peak_gib" in row:
            row["fits_rtx_3090"] = row["peak_gib"] * GIB < RTX_3090_BYTES
        result[name] = row
    return result


# ------------------------------------------------------------------------------------------ 3. attention kernels


def attention_kernels(device: torch.device, size: dict) -> dict:
    """SDPA kernels dispatched by one bf16 training forward + backward of the Transformer (op name -> count)."""
    from torch.profiler import ProfilerActivity, profile

    trainee = Trainee("transformer", size, device)
    data = trainee.batch(1, 512)
    trainee.step(data)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainee.step(data)
    counts: dict[str, int] = {}
    for event in prof.events():
        if any(word in event.name for word in ATTENTION_OPS):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------- 4. decoding


def cfg_inputs(model: TextToMusicLM, captions: int, length: int, device: torch.device):
    tokens, text, mask = inputs(model, captions, length, device)
    text, mask = with_null_condition(text, mask)  # cond + uncond rows, as generation runs them
    return torch.cat([tokens, tokens]), text, mask


@torch.no_grad()
def step_ms(model: TextToMusicLM, captions: int, position: int, device: torch.device, calls: int) -> float:
    tokens, text, mask = cfg_inputs(model, captions, position, device)
    _, state = model.prefill(tokens[:, :position], text, mask, max_len=position + calls + 8)
    token = tokens[:, position]
    for _ in range(3):
        model.step(token, state)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        model.step(token, state)
    sync(device)
    return (time.perf_counter() - t0) / calls * 1e3


@torch.no_grad()
def graph_step_ms(model: TextToMusicLM, captions: int, position: int, device: torch.device, calls: int) -> dict:
    """SiMBA's step captured once in a CUDA graph and replayed as generation would: a new token copied into the
    captured input before each replay. Checked against eager steps on a copy of the state fed the same tokens."""
    tokens, text, mask = cfg_inputs(model, captions, position + CHECKED_REPLAYS, device)
    _, state = model.prefill(tokens[:, :position], text, mask, max_len=position + CHECKED_REPLAYS + calls + 8)
    reference_state = copy.deepcopy(state)
    want = [model.step(tokens[:, position + i], reference_state) for i in range(CHECKED_REPLAYS)]
    token = tokens[:, position].clone()  # the graph's input
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm_state = copy.deepcopy(state)
    with torch.cuda.stream(side):
        for _ in range(3):
            model.step(token, warm_state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.step(token, state)  # recorded, not run: the state is still the prefill's
    err = 0.0
    for i in range(CHECKED_REPLAYS):  # the step updates its state in place, so each replay advances it
        token.copy_(tokens[:, position + i])
        graph.replay()
        err = max(err, (out.float() - want[i].float()).abs().max().item())
    pairs = zip(state_tensors(state), state_tensors(reference_state), strict=True)
    state_err = max((a - b).abs().max().item() for a, b in pairs)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        graph.replay()
    sync(device)
    ms = (time.perf_counter() - t0) / calls * 1e3
    return {"ms": ms, "max_abs_err_vs_eager": err, "state_max_abs_err_vs_eager": state_err}


@torch.no_grad()
def generate_ms(model: TextToMusicLM, captions: int, frames: int, device: torch.device) -> float:
    """ms per frame of `model.generate` (CFG 3, top-k 250: sampling included) for `captions` captions at once."""
    _, text, mask = inputs(model, captions, 1, device)
    model.generate(text, mask, 4, seed=0)  # first-call work (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    tokens = model.generate(text, mask, frames, seed=0)
    sync(device)
    if tokens.shape != (captions, frames) or not bool(((tokens >= 0) & (tokens < model.pad_id)).all()):
        raise RuntimeError(f"generate returned {tuple(tokens.shape)} tokens, or tokens outside the codebook")
    return (time.perf_counter() - t0) / frames * 1e3


def decoding(device: torch.device, size: dict, quick: bool) -> dict:
    calls = 20 if quick else 50
    positions = (100,) if quick else (100, 2500)
    result: dict = {}
    for arch in ("simba", "transformer"):
        model = eval_model(arch, size, device)
        for fast in paths(device) if arch == "simba" else [False]:
            set_fast_path(model, fast)
            name = f"{arch}_{path_name(fast)}" if arch == "simba" else arch
            for captions in (1, 32):
                for position in positions:
                    key = f"{name}_rows{2 * captions}_pos{position}_ms"
                    result[key] = attempt(partial(step_ms, model, captions, position, device, calls))
                    print(f"  {key}: {result[key]}", flush=True)
        set_fast_path(model, fast_path_available(device))
        for captions in (1, 32):
            key = f"{arch}_generate_{captions}_captions_ms_per_frame"
            result[key] = attempt(partial(generate_ms, model, captions, GENERATE_FRAMES, device))
            print(f"  {key}: {result[key]}", flush=True)
        if arch == "simba" and device.type == "cuda":
            for captions in (1, 32):
                key = f"simba_graph_rows{2 * captions}_pos100"
                # Capture can refuse an op (a host sync, a CPU tensor): that is a finding too.
                result[key] = attempt(partial(graph_step_ms, model, captions, 100, device, calls))
                print(f"  {key}: {result[key]}", flush=True)
        del model  # the next decoder's weights and states get the memory
    return result


# -------------------------------------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "mamba_ssm_kernels": mamba2.mamba_chunk_scan_combined is not None,
        "causal_conv1d": mamba2.causal_conv1d_fn is not None,
    }
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    return env


def attempt(fn):
    """fn(), or {"error": ...} with the traceback printed: one failing measurement must not cost the others."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}


def run_section(name: str, fn, results: dict) -> None:
    t0 = time.perf_counter()
    results[name] = attempt(fn)
    print(f"== {name} ({time.perf_counter() - t0:.0f} s)\n{json.dumps(results[name], indent=1)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every result")
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--sections", default="agreement,training,attention,decoding")
    args = parser.parse_args()
    device, size = torch.device(args.device), SIZES[args.size]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
    results: dict = {"environment": environment(device), "size": args.size}
    print(json.dumps(results["environment"]), flush=True)
    sections = {
        "agreement": lambda: agreement(device, size, args.quick),
        "training": lambda: training(device, size, args.quick),
        "attention": lambda: attention_kernels(device, size),
        "decoding": lambda: decoding(device, size, args.quick),
    }
    for name in args.sections.split(","):
        run_section(name, sections[name], results)
    if args.json:
        print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
