"""SiMBA's decoding step as one hand-written C++ kernel for the CPU: the `fused` strategy of `modeling.compiled`.

A step of a batch-1 + CFG stream (2 rows) is a stream over every weight; TorchInductor's version of it
(`compiled.py`'s `reduce` and `gemm`) splits each layer into ~16 parallel loops, each ending in a barrier after
which the next loop reads what the other cores wrote, and reaches the kernel through ~0.4 ms of Python per step
(dynamo's guards, the wrapper's ~200 arguments). `fused_step.cpp` does the whole step in one OpenMP region with 5
barriers per layer: cheap per-row work (the norms) is done by every thread rather than waited for, and each
weight product streams one contiguous range of weight rows per thread, one row at a time. It is reached through
ctypes with a handful of pointer arrays.

Built on first use with the system's C++ compiler (`$CXX`, else g++ / c++: the one TorchInductor needs too),
`-O3 -march=native -fopenmp` (~2 s), and kept in `~/.cache/simba-ttm/fused/` (`$XDG_CACHE_HOME`;
`SIMBA_FUSED_CACHE=DIR` moves it), keyed by the source, the compiler and the CPU. It runs on torch's OpenMP
runtime (the same libgomp, loaded once) with `torch.get_num_threads()` threads. Whether it is faster than
inductor's step is a property of the machine, so `compiled_step`'s `auto` times it beside the other strategies
and keeps the fastest.

Its SiLU and GELU use a vectorised exp (Cephes' polynomial) and GELU = x/2 erfc(-x/sqrt 2) from a Chebyshev fit:
within 2e-6 relative of float64 wherever |value| >= 1e-6 (`kernel_math`, tested), closer than torch's own fp32
GELU in its left tail.

Every call checks the decoding state's shapes, dtype and layout (the kernel writes it in place) and its layer
count, and compares the weights' and the state's addresses with the last call's in one C++ loop of torch's: where
one moved (a `.data` swap, a state tensor replaced) the pointer arrays are rebuilt and the weights checked again
(dtype, layout, the shapes the step was built with). The bound weights' memory is held, so an unchanged address is
the memory that was checked. The Parameter objects themselves, the norms' eps and dt_limit are read when the step
is built: replacing a Parameter object (`module.weight = nn.Parameter(...)`) needs a new step, which every
`generate(compile=True)` builds. One step object is not for concurrent calls from several Python threads (ctypes
releases the GIL; the workspace is shared), as one decoding state is not.

Supports what `PrefixSiMBA` builds, attention-free, fp32 on the CPU, 1..64 rows (`MAX_ROWS`; above 8 rows products
multiply tiles of 3 weight rows by blocks of 8 rows while those weight rows are in L1, so weights are read once);
`fused_problem(model)` says why another model cannot use it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from modeling.layers import MLP, DecodeState, RMSNorm, sinusoid_frequencies
from modeling.mamba2 import Mamba2

SOURCE = Path(__file__).with_name("fused_step.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
MAX_ROWS = 64  # fused_step.cpp's kMaxRows
BUILD_DIR_ENV = "SIMBA_FUSED_CACHE"
# Per layer, in fused_step.cpp's LayerParam order: attribute paths from a Block (None: an absent bias).
LAYER_PARAMS = (
    "norm1.weight", "mixer.in_proj.weight", "mixer.in_proj.bias", "mixer.conv1d.weight", "mixer.conv1d.bias",
    "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight", "mixer.out_proj.bias",
    "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip


class FusedStepError(RuntimeError):
    """The fused kernel rejected a call (see the message)."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cache_root() -> Path:
    """$XDG_CACHE_HOME/simba-ttm (~/.cache/simba-ttm): where the decoding step keeps its builds and choices."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "simba-ttm"


def _cache_dir() -> Path:
    """Where builds are kept: $SIMBA_FUSED_CACHE, else cache_root()/fused."""
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV]).expanduser()
    return cache_root() / "fused"


@functools.cache
def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), else what `platform` knows; printed with every benchmark figure too."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find the cached build of) fused_step.cpp for this CPU and load it. `extra_flags` (tests): e.g.
    ("-mno-avx512f",) builds the code an AVX2-only CPU gets."""
    flags = (*FLAGS, *extra_flags)
    compiler = _compiler()
    if compiler is None:
        raise FusedStepError("no C++ compiler (install g++ or set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, *flags, cpu_name()]).encode()).hexdigest()
    target = _cache_dir() / f"fused_step-{key[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(target.parent, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only home: build for this process only
            target = Path(tempfile.mkdtemp(prefix="simba-fused-")) / target.name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if built.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise FusedStepError(f"building {SOURCE.name} failed:\n{built.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the old file or the whole new one
    library = ctypes.CDLL(str(target))
    library.build_id = key[:16]
    library.simba_fused_step.restype = ctypes.c_int
    library.simba_fused_step.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2
    library.simba_fused_workspace_floats.restype = ctypes.c_int64
    library.simba_fused_workspace_floats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    library.simba_fused_math.restype = ctypes.c_int
    library.simba_fused_math.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return library


MATH = ("exp", "silu", "gelu")  # simba_fused_math's functions, by index


def kernel_math(name: str, x: Tensor) -> Tensor:
    """The kernel's own exp / silu / gelu of a float32 tensor (vector code + scalar tail), for tests."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    if _library().simba_fused_math(MATH.index(name), x.data_ptr(), out.data_ptr(), x.numel()):
        raise FusedStepError(f"simba_fused_math has no {name}")
    return out


def build_id() -> str:
    """A short hash of the loaded build (source, compiler, flags, CPU)."""
    return _library().build_id


def build_problem() -> str | None:
    """Why the fused kernel cannot be built on this machine, or None."""
    try:
        _library()
    except (FusedStepError, OSError) as err:
        return str(err)
    return None


def fused_problem(model: nn.Module) -> str | None:
    """Why `model` cannot decode with the fused kernel, or None. (The kernel also needs `build_problem()` None.)"""
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "token_emb"):
        return f"{type(model).__name__} is not a TextToMusicLM"
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return "the fused step runs fp32 weights on the CPU"
    if model.d_model % 2:
        return f"odd d_model {model.d_model}"
    if not isinstance(model.norm_f, RMSNorm) or tuple(model.token_emb.weight.shape) != (
        model.head.out_features,
        model.d_model,
    ):
        return "the final norm, token embedding or head is not the fused kernel's (RMSNorm, vocab x d_model)"
    for i, layer in enumerate(layers):
        mixer = getattr(layer, "mixer", None)
        if not isinstance(mixer, Mamba2) or getattr(layer, "cross_attn", None) is not None:
            return f"layer {i} is not a Mamba-2 block (attention or cross-attention)"
        if not isinstance(layer.mlp, MLP) or not all(isinstance(n, RMSNorm) for n in (layer.norm1, layer.norm2)):
            return f"layer {i}'s MLP or norm is not the fused kernel's"
        if not mixer.rmsnorm or mixer.norm_before_gate or mixer.D.dim() != 1:
            return f"layer {i}'s Mamba-2 options (rmsnorm, norm_before_gate, D per head) differ from the kernel's"
    return None


def _attribute(module: nn.Module, path: str) -> Tensor | None:
    for name in path.split("."):
        module = getattr(module, name)
    return module


# torch's C++ loop for "are these tensors still at these addresses" (what inductor's CUDA graphs check on every
# call); a Python loop where a torch lacks it.
_ADDRESSES_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


@dataclasses.dataclass
class _Bound:
    """A C array of tensors' data pointers (0 for None), and the addresses it was made from."""

    pointers: list[int]
    present: list[int]  # the indices of the tensors that are not None
    array: ctypes.Array
    keep: list[Tensor]  # with `keep=True`: the memory behind `pointers`, held so no other tensor gets those addresses

    @classmethod
    def of(cls, tensors: list[Tensor | None], keep: bool = False) -> _Bound:
        pointers = [0 if t is None else t.data_ptr() for t in tensors]
        present = [i for i, t in enumerate(tensors) if t is not None]
        held = [tensors[i].detach() for i in present] if keep else []  # aliases: they share the tensors' memory
        return cls(pointers, present, (ctypes.c_void_p * len(tensors))(*pointers), held)

    def holds(self, tensors: list[Tensor | None]) -> bool:
        """Whether `tensors` are at the array's addresses (not so after a `.data` swap to new memory, or a tensor
        replaced by another)."""
        if len(tensors) != len(self.pointers):
            return False
        if _ADDRESSES_EQUAL is not None:
            return _ADDRESSES_EQUAL(tensors, self.pointers, self.present)
        return all(tensors[i].data_ptr() == self.pointers[i] for i in self.present)

    def address(self, index: int) -> int:
        """The address of the array from entry `index` on."""
        return ctypes.addressof(self.array) + index * ctypes.sizeof(ctypes.c_void_p)


class FusedStep:
    """`model.step` through fused_step.cpp: `step(tokens, state) -> (rows, vocab)` logits, advancing `state`.

    Raises `FusedStepError` (from the constructor) where `fused_problem` or `build_problem` says no.
    """

    def __init__(self, model: nn.Module):
        problem = fused_problem(model) or build_problem()
        if problem:
            raise FusedStepError(f"cannot use the fused decoding step: {problem}")
        self.model = model
        self._library = _library()
        first = model.layers[0].mixer
        dims = (
            model.d_model, len(model.layers), first.d_inner, first.d_state, first.ngroups, first.nheads,
            first.headdim, first.d_conv, model.layers[0].mlp.fc1.out_features, model.head.out_features,
        )  # fmt: skip
        for i, layer in enumerate(model.layers):
            m = layer.mixer
            mine = (m.d_inner, m.d_state, m.ngroups, m.nheads, m.headdim, m.d_conv, layer.mlp.fc1.out_features)
            if mine != dims[2:9]:
                raise FusedStepError(f"layer {i}'s sizes {mine} differ from layer 0's {dims[2:9]}")
        self._dims = torch.tensor(dims, dtype=torch.int64)
        scalars = []
        for layer in model.layers:
            low, high = layer.mixer.dt_limit
            scalars += [layer.norm1.eps, layer.mixer.norm.eps, layer.norm2.eps, low, high]
        self._scalars = torch.tensor([*scalars, model.norm_f.eps], dtype=torch.float32)
        self._freqs = sinusoid_frequencies(model.d_model)  # positions embed as in the eager step
        self._params: list[Tensor | None] = [model.token_emb.weight, model.norm_f.weight, model.head.weight]
        self._params.append(self._freqs)
        for layer in model.layers:
            self._params += [_attribute(layer, path) for path in LAYER_PARAMS]
        self._vocab = model.head.out_features
        self._workspaces: dict[tuple[int, int], Tensor] = {}  # (rows, threads) -> scratch memory
        # The C pointer arrays of the weights and of the last call's state, with the addresses they were made from.
        self._weights: _Bound | None = None
        self._state: _Bound | None = None
        self._param_shapes = [None if t is None else t.shape for t in self._params]
        self._n_layers = len(model.layers)
        mixer = model.layers[0].mixer
        self._state_shapes = [(mixer.conv_dim, mixer.d_conv), (mixer.nheads, mixer.headdim, mixer.d_state)]

    def _bind_weights(self) -> _Bound:
        bound = self._weights
        if bound is None or not bound.holds(self._params):
            for t, shape in zip(self._params, self._param_shapes, strict=True):
                if t is None:
                    continue
                if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                    raise FusedStepError("the fused step needs contiguous fp32 CPU weights")
                if t.shape != shape:
                    raise FusedStepError(f"a weight of shape {shape} became {tuple(t.shape)}: build a new step")
            # The weights' shapes are checked only here, so their memory is held: while bound, an address cannot be
            # handed to another (differently shaped) tensor, and an unchanged address is the checked tensor.
            bound = self._weights = _Bound.of(self._params, keep=True)
        return bound

    def _check_state(self, state: DecodeState, rows: int) -> list[Tensor]:
        """next_pos, then every layer's conv and SSM state, checked on every call: the kernel writes them in place, so
        a wrong shape would be a wild write."""
        layers = state.layers
        if len(layers) != self._n_layers:
            raise FusedStepError(f"a decoding state of {len(layers)} layers for a model of {self._n_layers}")
        next_pos = state.next_pos
        if next_pos.shape != (rows,):
            raise FusedStepError(f"the decoding state was allocated for another batch than {rows} rows")
        if next_pos.dtype != torch.int64 or not next_pos.is_contiguous():
            raise FusedStepError("state.next_pos must be a contiguous int64 CPU tensor")
        shapes = [(rows, *shape) for shape in self._state_shapes]
        tensors = [next_pos]
        for layer in layers:
            for t, shape in zip((layer.mixer.conv_state, layer.mixer.ssm_state), shapes, strict=True):
                if t.shape != shape or t.dtype != torch.float32 or not t.is_contiguous():
                    raise FusedStepError(
                        f"the decoding state holds a {tuple(t.shape)} {t.dtype} tensor where {rows} rows need a "
                        f"contiguous float32 {shape}"
                    )
                tensors.append(t)
        return tensors

    def _bind_state(self, state: DecodeState, rows: int) -> _Bound:
        tensors = self._check_state(state, rows)
        bound = self._state
        if bound is None or not bound.holds(tensors):
            if not all(t.is_cpu for t in tensors):
                raise FusedStepError("the fused step needs the decoding state on the CPU")
            bound = self._state = _Bound.of(tensors)
        return bound

    def __call__(self, tokens: Tensor, state: DecodeState) -> Tensor:
        # This runs right after the previous step streamed ~150 MB through the caches, so every Python object it
        # touches is a cache miss: it does what safety needs and no more (~0.15 ms at bench/generate.py's mid size).
        tokens = tokens.reshape(-1)
        if not tokens.is_cpu:
            raise FusedStepError("the fused step takes CPU tokens")
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        rows, threads = tokens.shape[0], torch.get_num_threads()
        if not 1 <= rows <= MAX_ROWS:
            raise FusedStepError(f"the fused step takes 1..{MAX_ROWS} rows, got {rows}")
        states = self._bind_state(state, rows)
        weights = self._bind_weights()
        workspace = self._workspaces.get((rows, threads))
        if workspace is None:
            floats = self._library.simba_fused_workspace_floats(self._dims.data_ptr(), rows, threads)
            workspace = self._workspaces[(rows, threads)] = torch.empty(floats, dtype=torch.float32)
        logits = torch.empty(rows, self._vocab, dtype=torch.float32)
        status = self._library.simba_fused_step(
            self._dims.data_ptr(), self._scalars.data_ptr(), weights.array, states.address(1), tokens.data_ptr(),
            states.pointers[0], logits.data_ptr(), workspace.data_ptr(), rows, threads,
        )  # fmt: skip
        if status == 2:
            raise FusedStepError(f"a token outside the vocabulary 0..{self._vocab - 1}: {tokens.tolist()}")
        if status:
            raise FusedStepError(f"the fused step failed with status {status}")
        return logits
