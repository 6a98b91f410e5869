"""A compiled decoding step: SiMBA's per-token work as one fused, bandwidth-bound kernel on the CPU.

Decoding one token of a batch-1 + CFG stream multiplies a 2-row activation by every weight matrix, so a
step is a stream over all weights. Eager PyTorch hands each 2-row product to MKL's gemm, which reaches
about 7-10 GB/s on the 2-core AMD machines here (DRAM reads run at ~30 GB/s), and spends the rest of the
step on ~400 small operator calls. `compiled_step` compiles `model.step` with TorchInductor and two changes
to its defaults:

- products with at most `SMALL_ROWS` rows on the CPU become reductions (one pass over the weight matrix that
  multiplies every row while the weights stream by), instead of calls into gemm;
- `realize_opcount_threshold` is lowered, so an activation feeding such a product (GELU, the gated norm)
  is computed once into a buffer rather than re-evaluated inside the reduction for every output row.

The result matches the eager step to fp32 rounding (tested), and `bench/generate.py` measures both.
Only decoders whose step has fixed shapes are compiled: attention layers grow their KV cache every token,
which would recompile every step, so models with attention fall back to the eager step (with a warning).

`modeling.lm` calls into this module (`generate(compile=True)`), so this module takes the model as a plain
`nn.Module` (a `TextToMusicLM`: `step(tokens, state)` and `head`) and imports only `modeling.layers`: the
dependency points one way, lm -> compiled -> layers.
"""

from __future__ import annotations

import functools
import sysconfig
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from modeling.layers import DecodeState, SelfAttention

# Products with this many rows or fewer (batch x 2 for CFG) are written as reductions on the CPU.
SMALL_ROWS = 8
# Inductor's default is 30: pointwise chains cheaper than that are inlined into their consumers, which for
# a reduction over a weight matrix means recomputing them once per output row.
REALIZE_OPCOUNT_THRESHOLD = 8

StepFn = Callable[[Tensor, DecodeState], Tensor]


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


def _decode_backend(gm: torch.fx.GraphModule, example_inputs):
    # torch._inductor internals: the public torch.compile takes no decomposition table. Imported here: inductor
    # costs seconds to import, and only compilation needs it (not eager generation, which imports this module).
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table[torch.ops.aten.mm.default] = _mm
    table[torch.ops.aten.addmm.default] = _addmm
    # AOTAutograd's cache keys on the graph before decomposition, blind to this table; inductor's own cache
    # (after decomposition) stays on and makes later compilations of the same graph fast.
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(
            gm,
            example_inputs,
            decompositions=table,
            config_patches={"realize_opcount_threshold": REALIZE_OPCOUNT_THRESHOLD},
        )


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


def compiled_step(model: nn.Module) -> StepFn:
    """`model.step` compiled (the first call per model and batch size compiles: ~30 s on 2 cores, less cached).

    Returns the eager `model.step` (and warns) for models with attention layers, and on a CPU that cannot
    build kernels.
    """
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
    # Dynamo keeps compiled code on TextToMusicLM.step's code object, guarded by this backend and the
    # model, so a new wrapper per call reuses it. dynamic=False: one graph per batch size, row count static.
    compiled = torch.compile(model.step, backend=_decode_backend, dynamic=False)

    def step(tokens: Tensor, state: DecodeState) -> Tensor:
        # Guards include strides: a column sliced out of a (B, T) tensor would otherwise recompile per T.
        return compiled(tokens.reshape(-1, 1).contiguous(), state)

    return step
