"""A compiled decoding step: SiMBA's per-token work as one fused, bandwidth-bound kernel on the CPU.

Decoding one token of a batch-1 + CFG stream multiplies a 2-row activation by every weight matrix, so a
step is a stream over all weights. Eager PyTorch spends most of a step on ~400 small operator calls, and
hands each 2-row product to MKL's gemm. `compiled_step` runs `model.step` one of three ways (the *strategy*):

- `reduce`: TorchInductor compiles the step, which fuses the small operators, and products with at most
  `SMALL_ROWS` rows on the CPU become reductions, one pass over the weight matrix that multiplies every row
  while the weights stream by. On the 2-core AMD Zen 4 machines here MKL's 2-row gemm reads weights at
  ~8 GB/s (a plain read runs at ~30 GB/s), these reductions at 23-30: the step takes ~6.5 ms reduced against
  ~19 ms with gemm at bench/generate.py's mid size;
- `gemm`: the same compiled step with the products left as calls into the BLAS (MKL). On an Intel Xeon with
  AVX-512/AMX, MKL's 2-row gemm streams the weights well and the reductions fall behind: on the Xeon host of
  an H200 box (2 threads, torch 2.11) gemm took 8.3 ms/step and reduce 10.5 (bench/generate.py);
- `fused`: a hand-written C++ kernel for the whole step (`modeling.fused`, built with the system compiler on
  first use, ~2 s), up to `MAX_ROWS` rows (above 8 in register tiles of 3 weight rows x 8 rows: the weights are
  read once), fp32.
  Inductor's step runs ~16 parallel loops per layer, each ending in a barrier, and reaches its kernel through
  ~0.4 ms of Python per call; the fused kernel has 5 barriers per layer and one ctypes call. On the AMD
  machines here it is the fastest: auto's timings at bench/generate.py's mid size gave fused 4.4 ms/step,
  reduce 5.2 and gemm 17.7 at batch 1; fused 49.2 and gemm 60.5 at batch 32 (bench/evaluate.py).

Which is fastest is a property of the machine, so by default (`auto`) the first call for a batch shape
builds all three, times them on copies of the caller's state, and keeps the fastest; the choice is cached per
model, batch shape and thread count, and in a small JSON file (`choice_cache_file()`: by default
`~/.cache/simba-ttm/decode_strategy.json`, `SIMBA_DECODE_STRATEGY_CACHE=FILE` moves it, `=off` disables it)
keyed by the CPU model, torch version, thread count, rows, dtype, the model's weight shapes and the page size
(below), so later processes on the machine (every Ray generation task of an evaluation is one) build only
the winner. Delete the file to time again. `strategy=` or the `SIMBA_DECODE_STRATEGY` environment variable
(`auto | reduce | gemm | fused`) forces one, for tests and for machines where the timing is known. With more
than `SMALL_ROWS` rows (batch > 4 with CFG) reduce's products are gemm's, so gemm and fused are timed; above
`MAX_ROWS` (batch > 32) only gemm runs, and nothing is timed.

Under both inductor strategies `realize_opcount_threshold` is lowered, so an activation feeding a product (GELU,
the gated norm) is computed once into a buffer rather than re-evaluated inside a reduction for every output row.
All three match the eager step to fp32 rounding (tested), and `bench/generate.py` measures them.

A step streams all weights and the whole recurrent state, which `prefill` puts on 2 MiB pages on the CPU
(`modeling.pages`; so are the copies of the state that `auto` times on). On the AMD machines here that made the
mid-size step 1.2-1.3x faster (bench/generate.py, side by side); `SIMBA_HUGE_PAGES=off` keeps 4 KiB pages, and
the page size is part of what a timed choice is kept for.

Only decoders whose step has fixed shapes are compiled: attention layers grow their KV cache every token,
which would recompile every step, so models with attention fall back to the eager step (with a warning).

`modeling.lm` calls into this module (`generate(compile=True)`), so this module takes the model as a plain
`nn.Module` (a `TextToMusicLM`: `step(tokens, state)` and `head`) and imports only the modules below it: the
dependency points one way, lm -> compiled -> fused -> (layers, mamba2).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sysconfig
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from modeling.fused import MAX_ROWS, FusedStep, FusedStepError, build_id, cache_root, cpu_name
from modeling.layers import DecodeState, SelfAttention, state_tensors
from modeling.pages import huge_page_problem, use_huge_pages

# Products with this many rows or fewer (batch x 2 for CFG) are written as reductions under `reduce`.
SMALL_ROWS = 8
# Inductor's default is 30: pointwise chains cheaper than that are inlined into their consumers, which for
# a reduction over a weight matrix means recomputing them once per output row.
REALIZE_OPCOUNT_THRESHOLD = 8

Strategy = Literal["reduce", "gemm", "fused"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
INDUCTOR_STRATEGIES: tuple[Strategy, ...] = ("reduce", "gemm")  # the rest are hand-written kernels
STRATEGY_ENV = "SIMBA_DECODE_STRATEGY"
# The auto choice: after one warm-up call each, `TIMING_ROUNDS` rounds of `TIMING_CALLS` steps per strategy,
# interleaved; the strategy with the faster best round wins (other processes' load only ever adds time).
TIMING_ROUNDS = 5
TIMING_CALLS = 3

# The file that keeps auto choices across processes (see the module docstring); "off" disables it.
CHOICE_CACHE_ENV = "SIMBA_DECODE_STRATEGY_CACHE"

StepFn = Callable[[Tensor, DecodeState], Tensor]

# How often each strategy's backend ran (one graph compiled by dynamo each time): lets tests check that a step
# really was compiled (dynamo silently runs eagerly once a code object has hit its recompile limit).
COMPILATIONS: Counter[str] = Counter()


@dataclass(frozen=True)
class StrategyChoice:
    """The weight-product strategy a compiled step uses for one batch shape, and why."""

    strategy: Strategy
    reason: str  # "timed", "forced by ...", or why nothing was timed
    ms_per_step: dict[str, float] = field(default_factory=dict)  # best round per strategy (when timed)


# model -> {(rows, device, dtype, threads, pages): choice}; weak, so a dropped model takes its choices with it.
_CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, StrategyChoice]] = weakref.WeakKeyDictionary()


def _rows_times(a: Tensor, b: Tensor) -> Tensor:
    """(M, K) @ (K, N) as M reductions over K that inductor fuses into one loop over b."""
    return torch.stack([(a[i].unsqueeze(1) * b).sum(dim=0) for i in range(a.shape[0])])


def _is_small(a: Tensor) -> bool:
    return a.device.type == "cpu" and isinstance(a.shape[0], int) and a.shape[0] <= SMALL_ROWS


def _mm(a: Tensor, b: Tensor):
    return _rows_times(a, b) if _is_small(a) else NotImplemented


def _addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1):
    if _is_small(a) and beta == 1 and alpha == 1:
        return bias + _rows_times(a, b)
    return NotImplemented


def _decode_backend(strategy: Strategy, gm: torch.fx.GraphModule, example_inputs):
    # torch._inductor internals: the public torch.compile takes no decomposition table. Imported here: inductor
    # costs seconds to import, and only compilation needs it (not eager generation, which imports this module).
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    COMPILATIONS[strategy] += 1
    table = dict(select_decomp_table())
    if strategy == "reduce":
        table[torch.ops.aten.mm.default] = _mm
        table[torch.ops.aten.addmm.default] = _addmm
    # AOTAutograd's cache keys on the graph before decomposition, blind to this table; inductor's own cache
    # (after decomposition) stays on and makes later compilations of the same graph fast.
    # size_asserts: the wrapper re-checks every input's sizes and strides (~200 tensors) on each call, which dynamo's
    # guards (dynamic=False) have just checked: ~0.2 ms of a ~6 ms step.
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(
            gm,
            example_inputs,
            decompositions=table,
            config_patches={"realize_opcount_threshold": REALIZE_OPCOUNT_THRESHOLD, "size_asserts": False},
        )


# One backend object per strategy for the life of the process: dynamo keys its compiled code on the backend,
# so every `compiled_step` of a model reuses what an earlier one compiled.
_BACKENDS = {strategy: functools.partial(_decode_backend, strategy) for strategy in INDUCTOR_STRATEGIES}


def supports_compiled_step(model: nn.Module) -> bool:
    """True when every layer's decoding state has a fixed shape (no attention layer with a growing cache)."""
    return not any(isinstance(module, SelfAttention) for module in model.modules())


@functools.cache  # a property of the machine; finding the compiler runs `c++ --version`
def cpu_compile_problem() -> str | None:
    """Why TorchInductor cannot build CPU kernels on this machine (no C++ compiler, no Python headers), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # here: inductor is slow to import (see above)

        get_cpp_compiler()
    except Exception as err:  # torch raises its own InvalidCxxCompiler
        return f"no C++ compiler for TorchInductor ({err}); install g++ or set CXX"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"Python headers are missing ({header}); install them (e.g. python3-dev)"
    return None


def choice_cache_file() -> Path | None:
    """Where auto choices are kept across processes: $SIMBA_DECODE_STRATEGY_CACHE, else
    $XDG_CACHE_HOME/simba-ttm/decode_strategy.json (~/.cache/...); None when that variable is "off"."""
    value = os.environ.get(CHOICE_CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    return cache_root() / "decode_strategy.json"


def _machine_key(model: nn.Module, rows: int, dtype: torch.dtype, pages: str, candidates: list[str]) -> str:
    """What a timed choice holds for: this CPU and torch, the thread count, the rows, the model's weight shapes, the
    page size its memory is on, and the strategies timed (the fused kernel's with its build: a new kernel is timed
    again)."""
    shapes = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in model.named_parameters()]).encode()).hexdigest()
    timed = "/".join(f"fused {build_id()}" if s == "fused" else s for s in candidates)
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {rows} rows | " + (
        f"{str(dtype).removeprefix('torch.')} | weights {shapes[:16]} | {pages} | {timed}"
    )


def _read_choices(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # unreadable or half-written by hand: time again, and rewrite it
        warnings.warn(f"ignoring the compiled-step strategy cache {file} ({err!r})", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def _remember_choice(file: Path, key: str, choice: StrategyChoice) -> None:
    """Add one timed choice to the cache file (temporary file + rename: readers never see a partial file)."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        choices = _read_choices(file)
        choices[key] = {"strategy": choice.strategy, "ms_per_step": choice.ms_per_step}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(choices, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, file)
    except OSError as err:  # a read-only home, say: the choice still holds for this process
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot keep the compiled-step strategy in {file} ({err!r})", stacklevel=3)


def _requested_strategy(strategy: str | None) -> tuple[str, str]:
    """(strategy or "auto", where it came from): the argument, else the environment variable, else auto."""
    source = "argument"
    if strategy is None:
        strategy, source = os.environ.get(STRATEGY_ENV, "").strip() or "auto", STRATEGY_ENV
    valid = ("auto", *STRATEGIES)
    if strategy not in valid:
        raise ValueError(f"unknown compiled-step strategy {strategy!r} (from {source}); valid: {', '.join(valid)}")
    return strategy, source


class CompiledStep:
    """`model.step` under TorchInductor with a weight-product strategy (see the module docstring).

    Call it as `model.step`: `step(tokens, state) -> (B, V) logits`. `choice(rows)` says which strategy a
    batch of `rows` rows (batch x 2 with CFG) used, and the timings behind an automatic choice.
    """

    def __init__(self, model: nn.Module, strategy: str | None = None):
        self.model = model
        # The page size of the step's memory on the CPU: part of what makes one strategy faster than the other.
        self.page_size = "2 MiB pages" if huge_page_problem() is None else "4 KiB pages"
        self.requested, self._source = _requested_strategy(strategy)
        # Dynamo keeps compiled code on TextToMusicLM.step's code object, guarded by the backend and the input
        # shapes (parameters are graph inputs), so new wrappers, and other models of the same shapes, reuse it.
        # dynamic=False: one graph per batch size, so the row count is static.
        self._compiled: dict[str, StepFn] = {
            s: torch.compile(model.step, backend=_BACKENDS[s], dynamic=False) for s in INDUCTOR_STRATEGIES
        }
        self._fused_problem: str | None = None  # why the fused kernel cannot run this model, once tried
        self._forced: dict[tuple, StrategyChoice] = {}

    def _fused(self) -> StepFn | None:
        """The fused kernel for this model (built on first use: `modeling.fused`), or None where it cannot run."""
        if "fused" not in self._compiled and self._fused_problem is None:
            try:
                self._compiled["fused"] = FusedStep(self.model)
                COMPILATIONS["fused"] += 1
            except FusedStepError as err:
                self._fused_problem = str(err)
        return self._compiled.get("fused")

    def _run(self, strategy: str, tokens: Tensor, state: DecodeState) -> Tensor:
        if strategy == "fused" and self._fused() is None:
            raise FusedStepError(self._fused_problem)
        return self._compiled[strategy](tokens, state)

    def _key(self, tokens: Tensor) -> tuple:
        return tokens.shape[0], tokens.device, self.model.head.weight.dtype, torch.get_num_threads(), self.page_size

    def choice(self, rows: int, device: torch.device | str = "cpu") -> StrategyChoice | None:
        """The strategy used for `rows` rows on `device` at the current thread count (None: not called yet)."""
        key = (rows, torch.device(device), self.model.head.weight.dtype, torch.get_num_threads(), self.page_size)
        return (self._forced if self.requested != "auto" else _CHOICES.get(self.model, {})).get(key)

    def __call__(self, tokens: Tensor, state: DecodeState) -> Tensor:
        # Guards include strides: a column sliced out of a (B, T) tensor would otherwise recompile per T.
        tokens = tokens.reshape(-1, 1).contiguous()
        key = self._key(tokens)
        if self.requested != "auto":
            if key not in self._forced:
                self._forced[key] = self._forced_choice(tokens)
            return self._run(self._forced[key].strategy, tokens, state)
        choices = _CHOICES.setdefault(self.model, {})
        if key not in choices:
            choices[key] = self._choose(tokens, state)
        return self._run(choices[key].strategy, tokens, state)

    def _forced_choice(self, tokens: Tensor) -> StrategyChoice:
        if self.requested == "fused" and tokens.shape[0] > MAX_ROWS:
            return StrategyChoice("gemm", f"{tokens.shape[0]} rows > the fused kernel's {MAX_ROWS}: gemm")
        return StrategyChoice(self.requested, f"forced by {self._source}")

    def _choose(self, tokens: Tensor, state: DecodeState) -> StrategyChoice:
        if tokens.device.type != "cpu":
            return StrategyChoice("gemm", "not on the CPU: reductions apply to CPU products only")
        candidates = self._candidates(tokens.shape[0])
        if len(candidates) == 1:
            return StrategyChoice(candidates[0], f"{tokens.shape[0]} rows: {candidates[0]} is the only strategy")
        file = choice_cache_file()
        key = _machine_key(self.model, tokens.shape[0], self.model.head.weight.dtype, self.page_size, candidates)
        kept = _read_choices(file).get(key) if file else None
        if isinstance(kept, dict) and kept.get("strategy") in candidates:
            return StrategyChoice(
                kept["strategy"], f"timed earlier on this machine ({file})", kept.get("ms_per_step", {})
            )
        choice = self._time_all(tokens, state, candidates)
        if file and choice.reason == "timed":
            _remember_choice(file, key, choice)
        return choice

    def _candidates(self, rows: int) -> list[str]:
        """The strategies worth timing for `rows` rows: reduce (only up to SMALL_ROWS: above, its products are gemm's),
        gemm, and the fused kernel where it builds (up to MAX_ROWS)."""
        fused = rows <= MAX_ROWS and self._fused() is not None
        return [*(["reduce"] if rows <= SMALL_ROWS else []), "gemm", *(["fused"] if fused else [])]

    def _time_all(self, tokens: Tensor, state: DecodeState, candidates: list[str]) -> StrategyChoice:
        # Each strategy compiles, warms up and is timed on its own copy of the state: the caller's state is
        # advanced only by the real call that follows.
        trials = {}
        for s in candidates:
            trials[s] = copy.deepcopy(state)
            use_huge_pages(state_tensors(trials[s]))  # the copy is plain memory; the caller's came from prefill
            try:
                for _ in range(2):  # compile, then one warm-up call
                    self._compiled[s](tokens, trials[s])
            except Exception as err:  # an inductor failure for one strategy leaves the other
                warnings.warn(f"compiling the decoding step with strategy {s!r} failed ({err!r})", stacklevel=3)
                del trials[s]
        if not trials:
            raise RuntimeError("the decoding step compiled with no strategy (see the warnings)")
        if len(trials) == 1:
            return StrategyChoice(next(iter(trials)), "the other strategies failed to compile")
        seconds: dict[str, list[float]] = {s: [] for s in trials}
        for _ in range(TIMING_ROUNDS):
            for s in trials:
                t0 = time.perf_counter()
                for _ in range(TIMING_CALLS):
                    self._compiled[s](tokens, trials[s])
                seconds[s].append((time.perf_counter() - t0) / TIMING_CALLS)
        ms = {s: min(v) * 1e3 for s, v in seconds.items()}
        return StrategyChoice(min(ms, key=ms.__getitem__), "timed", ms)


def compiled_step(model: nn.Module, strategy: str | None = None) -> StepFn:
    """`model.step` compiled (the first call per model and batch size compiles: ~30 s on 2 cores, less cached).

    Args:
        model: a `TextToMusicLM`.
        strategy: `auto` (time the strategies that apply on the first call per batch shape and keep the fastest),
            `reduce`, `gemm` or `fused`; None reads `SIMBA_DECODE_STRATEGY`, and defaults to `auto`.
    Returns the eager `model.step` (and warns) for models with attention layers, and on a CPU that cannot
    build kernels; otherwise a `CompiledStep`.
    """
    _requested_strategy(strategy)  # a bad value is an error on every machine, not only where it compiles
    if not supports_compiled_step(model):
        warnings.warn(
            f"{type(model).__name__} has attention layers, whose KV cache grows every token; "
            "decoding with the eager step (compile applies to attention-free SiMBA)",
            stacklevel=2,
        )
        return model.step
    problem = cpu_compile_problem() if model.head.weight.device.type == "cpu" else None
    if problem:
        warnings.warn(f"cannot compile the decoding step: {problem}; decoding with the eager step", stacklevel=2)
        return model.step
    return CompiledStep(model, strategy)
