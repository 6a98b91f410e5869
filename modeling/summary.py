"""Size, compute and memory of a configured model, without allocating it (`simba-ttm info`).

Parameters and cache sizes are counted from the real modules built on the `meta` device. FLOPs and the
training-memory figure are analytic estimates (stated as such): matmul FLOPs are 2 x weights per token,
plus the sequence-mixing terms of the SSD scan or attention; training is 3x forward. A weight counts for the tokens
it is applied to: the caption-only ones (text projection, cross-attention keys/values) for the caption's tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from configs.schema import ExperimentConfig
from modeling.builders import build_model
from modeling.layers import state_tensors
from modeling.lm import TextToMusicLM
from modeling.transformer import CrossTransformer

# A typical Flan-T5 caption length in tokens (captions of the paper are one or two sentences).
TYPICAL_TEXT_LEN = 64


@dataclass
class ModelSummary:
    arch: str
    params: int
    params_trainable: int
    seq_len: int  # tokens per training sample (BOS + frames; SiMBA adds the text prefix)
    flops_per_token_forward: float
    flops_per_token_train: float
    train_memory_bytes_estimate: int  # at train.batch_size, one micro-batch, see estimate_train_memory
    cache_bytes_per_sample: int  # decoding state for generation.seconds of audio, fp32
    generation_frames: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# Modules applied to the caption's tokens only: the text projection, and cross-attention's keys and values.
CAPTION_ONLY = ("text_proj", "cross_attn.kv_proj")


def _caption_only(name: str) -> bool:
    return any(name.startswith(f"{m}.") or f".{m}." in name for m in CAPTION_ONLY)


def matmul_flops_per_sample(model: TextToMusicLM, seq_len: int, text_len: int) -> float:
    """Matmul FLOPs (2 per weight per token it is applied to) of one sample of `seq_len` positions, `text_len` of
    them caption tokens (a prefix in SiMBA; the cross-attention memory in the Transformer). Caption-only weights run
    on the caption's tokens, the head on the audio positions, every other weight on all positions. The embedding
    lookup is free."""
    prefix = text_len if not isinstance(model, CrossTransformer) else 0  # positions that are caption, not audio
    flops = 0.0
    for name, p in model.named_parameters():
        if p.ndim != 2 or name.startswith("token_emb"):
            continue
        if _caption_only(name):
            tokens = text_len
        elif name.startswith("head."):
            tokens = seq_len - prefix
        else:
            tokens = seq_len
        flops += 2.0 * p.numel() * tokens
    return flops


def forward_flops_per_token(cfg: ExperimentConfig, model: TextToMusicLM, seq_len: int, text_len: int) -> float:
    """Forward FLOPs per position of a `seq_len`-position sample (SiMBA's positions include the caption prefix)."""
    m = cfg.model
    flops = matmul_flops_per_sample(model, seq_len, text_len) / seq_len
    n_attn = m.n_layers if m.arch == "transformer" else len(m.attn_layers)
    n_ssm = m.n_layers - n_attn
    # Causal attention: QK^T and AV over on average half the context, 2 FLOPs per multiply-add.
    flops += n_attn * 2 * 2 * m.d_model * (seq_len / 2)
    if m.arch == "transformer":
        flops += m.n_layers * 2 * 2 * m.d_model * text_len  # cross-attention to the caption
    if n_ssm:
        d_inner = m.expand * m.d_model
        nheads = d_inner // m.headdim
        q, n, p = m.chunk_size, m.d_state, m.headdim
        # SSD per token: intra-chunk C.B^T scores and their product with x, then state write and read.
        ssd = 2 * q * n * m.ngroups + 2 * q * nheads * p + 2 * 2 * nheads * p * n
        conv = 2 * (d_inner + 2 * m.ngroups * n) * m.d_conv
        flops += n_ssm * (ssd + conv)
    return flops


def saved_bytes_per_token(cfg: ExperimentConfig, low: int) -> list[int]:
    """Bytes each layer keeps for backward per token, in a training step as the loop runs it (dropout on).

    `low` is the size of what autocast computes in bf16 (2; 4 in fp32). The residual stream stays fp32, and so does
    each RMSNorm (its input and its normalised output are kept). A Mamba-2 layer is counted as mamba_ssm's kernels
    run it: the pure-PyTorch path keeps its chunked scan's intermediates too, several times more (bench/cuda.py).
    """
    m = cfg.model
    d = m.d_model
    norm = 8 * d  # fp32 input + normalised output
    mask = d if m.dropout > 0 else 0  # one byte per element of each residual branch's dropout mask
    mlp = norm + low * (d + 2 * m.mlp_dim) + mask  # fc1's input, GELU's input and output
    attention = norm + low * (d + 3 * d + d) + mask  # qkv's input, q/k/v, the attention output
    if m.arch == "transformer":
        cross = norm + low * (d + d + d) + mask  # q's input, q, the attention output (the caption's K/V: negligible)
        return [attention + cross + mlp] * m.n_layers
    d_inner = m.expand * d
    conv_dim = d_inner + 2 * m.ngroups * m.d_state
    d_in_proj = 2 * d_inner + 2 * m.ngroups * m.d_state + d_inner // m.headdim
    # in_proj's input and output; the conv's padded input, its output and SiLU's; the scan's output and the norm's
    mamba = norm + low * (d + d_in_proj + 3 * conv_dim + 2 * d_inner) + mask
    return [(attention if i in m.attn_layers else mamba) + mlp for i in range(m.n_layers)]


def estimate_train_memory(cfg: ExperimentConfig, params: int, seq_len: int) -> int:
    """Peak bytes of a training step at one micro-batch of `train.batch_size` x `seq_len` tokens.

    fp32 weights + grads + AdamW moments (16 B/param), autocast's bf16 copies of the weights (2 B/param), the
    activations kept for backward (`saved_bytes_per_token`) and the fp32 logits + their gradient. Against the peak
    allocated memory measured on an H200 (bench/cuda.py, bf16, batch 4 x 2588 tokens, dropout 0.3): 20.6 GiB
    estimated vs 21.1 measured for SiMBA with mamba_ssm's kernels, 17.7 vs 17.0 for the Transformer
    (tests/modeling/test_summary.py). On the CPU (fp32) and on a GPU without mamba_ssm, SiMBA needs more.
    """
    m, t = cfg.model, cfg.train
    low = 4 if t.precision == "fp32" or (t.precision == "auto" and not t.use_gpu) else 2
    weights = (16 + (2 if low == 2 else 0)) * params
    activations = t.batch_size * seq_len * sum(saved_bytes_per_token(cfg, low))
    logits = t.batch_size * (cfg.data.max_frames + 1) * m.vocab_size * 4 * 2
    return weights + activations + logits


def cache_bytes(model: TextToMusicLM, n_tokens: int, text_len: int) -> int:
    """Bytes of the decoding state for one sample, measured on meta-device buffers the model allocates."""
    prefix = 0 if isinstance(model, CrossTransformer) else text_len  # a prefix model's attention caches the text
    state = model.allocate_state(1, prefix + n_tokens, device="meta", dtype=torch.float32)
    tensors = state_tensors(state.layers)  # the caches; the position counter and padding masks are not counted
    total = sum(t.numel() * t.element_size() for t in tensors if t.dtype != torch.bool)
    if any(layer.cross is not None for layer in state.layers):
        d = model.d_model
        total += len(state.layers) * 2 * text_len * d * 4  # cross-attention keys/values of the caption
    return total


def summarize(cfg: ExperimentConfig, text_len: int = TYPICAL_TEXT_LEN) -> ModelSummary:
    with torch.device("meta"):
        model = build_model(cfg.model)
    params, trainable = count_params(model)
    seq_len = cfg.data.max_frames + 1 + (text_len if cfg.model.arch == "simba" else 0)
    fwd = forward_flops_per_token(cfg, model, seq_len, text_len)
    n_frames = cfg.generation.n_frames(cfg.data.frame_rate)
    return ModelSummary(
        arch=cfg.model.arch,
        params=params,
        params_trainable=trainable,
        seq_len=seq_len,
        flops_per_token_forward=fwd,
        flops_per_token_train=3 * fwd,
        train_memory_bytes_estimate=estimate_train_memory(cfg, params, seq_len),
        cache_bytes_per_sample=cache_bytes(model, n_frames + 1, text_len),
        generation_frames=n_frames,
    )
