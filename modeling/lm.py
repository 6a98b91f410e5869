"""The language-model shell both decoders share: embeddings, text projection, head, loss, CFG, generation.

Conventions every caller relies on:
- tokens are DAC codebook-0 ids in [0, 1024); id `pad_id` = vocab_size - 1 = 1024 is both BOS and padding.
  A training sequence is [BOS, a_1, ..., a_T] (right-padded with 1024); logits at position t predict a_{t+1}.
- text is Flan-T5 output, right-padded: `text` (B, S, text_dim) with `text_mask` (B, S) bool, True = real.
- the null condition for classifier-free guidance is one all-zero text frame. Training replaces a caption by
  it with probability `cond_dropout`; generation uses the very same tensor for the unconditional half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.compiled import compiled_step
from modeling.layers import DecodeState, RMSNorm, state_tensors
from modeling.pages import use_huge_pages
from modeling.sampling import cfg_combine, sample_next


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None


def null_condition(batch_size: int, text_dim: int, length: int = 1, device=None, dtype=None):
    """The unconditional text: one all-zero frame (right-padded to `length`). Returns (text, mask)."""
    text = torch.zeros(batch_size, length, text_dim, device=device, dtype=dtype)
    mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return text, mask


def with_null_condition(text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stack [text; null] along the batch (the cond + uncond batch of classifier-free guidance)."""
    null_text, null_mask = null_condition(
        text.shape[0], text.shape[-1], length=text.shape[1], device=text.device, dtype=text.dtype
    )
    return torch.cat([text, null_text]), torch.cat([text_mask, null_mask])


class TextToMusicLM(nn.Module):
    """Base class: subclasses define `_hidden` (full sequence) and `_step_hidden` (one token)."""

    def __init__(self, *, vocab_size: int, d_model: int, text_dim: int, cond_dropout: float, norm_eps: float):
        super().__init__()
        self.vocab_size = vocab_size
        self.pad_id = vocab_size - 1
        self.d_model = d_model
        self.text_dim = text_dim
        self.cond_dropout = cond_dropout
        self.token_emb = nn.Embedding(vocab_size, d_model)
        # Frozen Flan-T5 features -> model width (the paper code's Linear + LayerNorm).
        self.text_proj = nn.Sequential(nn.Linear(text_dim, d_model), nn.LayerNorm(d_model))
        self.layers = nn.ModuleList()
        self.norm_f = RMSNorm(d_model, norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    # --- to be provided by the architecture -------------------------------------------------------------
    def _hidden(self, tokens: Tensor, text: Tensor, text_mask: Tensor, state: DecodeState | None) -> Tensor:
        """(B, T) tokens -> (B, T, D) final hidden states at the token positions; fills `state` if given."""
        raise NotImplementedError

    def _step_hidden(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """(B, 1) tokens -> (B, 1, D), advancing `state` by one position."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------
    def _init_weights(self, n_layers: int) -> None:
        """GPT-style init for the dense layers; residual output projections scaled by 1/sqrt(2 n_layers).

        Mamba-2's own A_log / dt_bias / D / conv initialisation is left untouched.
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02
                if name.endswith(("out_proj", "fc2")):
                    std = 0.02 / (2 * n_layers) ** 0.5
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        device = device or self.head.weight.device
        layers = [layer.allocate_cache(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]
        return DecodeState(layers=layers, next_pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    def drop_condition(self, text: Tensor, text_mask: Tensor, generator: torch.Generator | None = None):
        """Classifier-free guidance training: replace each caption by the null condition with p=cond_dropout."""
        if not self.training or self.cond_dropout <= 0:
            return text, text_mask
        B = text.shape[0]
        drop = torch.rand(B, generator=generator, device=text.device) < self.cond_dropout  # (B,)
        null_text, null_mask = null_condition(B, text.shape[-1], text.shape[1], device=text.device, dtype=text.dtype)
        text = torch.where(drop[:, None, None], null_text, text)
        text_mask = torch.where(drop[:, None], null_mask, text_mask)
        return text, text_mask

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.norm_f(hidden))

    def forward(
        self,
        tokens: Tensor,
        text: Tensor,
        text_mask: Tensor,
        targets: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> LMOutput:
        """Teacher-forced forward.

        Args:
            tokens: (B, T) long, tokens[:, 0] = BOS.
            text: (B, S, text_dim) right-padded text features; text_mask: (B, S) bool.
            targets: optional (B, T) long, `pad_id` positions are ignored by the loss.
        """
        text, text_mask = self.drop_condition(text, text_mask)
        logits = self.logits(self._hidden(tokens, text, text_mask, None))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=self.pad_id,
                label_smoothing=label_smoothing,
            )
        return LMOutput(logits=logits, loss=loss)

    def prefill(self, tokens: Tensor, text: Tensor, text_mask: Tensor, max_len: int) -> tuple[Tensor, DecodeState]:
        """Run the prompt once and build the decoding state. Returns last-position logits (B, V) and state.

        `max_len` counts token positions (BOS included); room for the text prefix is added here, since a
        prefix model's attention layers (hybrids) cache it too. On the CPU the weights and the state end up on huge
        pages (`modeling.pages`; `SIMBA_HUGE_PAGES=off` keeps 4 KiB pages).
        """
        state = self.allocate_state(tokens.shape[0], text.shape[1] + max_len, device=tokens.device)
        hidden = self._hidden(tokens, text, text_mask, state)
        # Every step streams all weights and the whole state: on the CPU, 2 MiB pages spare a TLB miss per 4 KiB
        # (`modeling.pages`; the state's own buffers were allocated on them, the rest is collapsed here).
        use_huge_pages([*self.parameters(), *state_tensors(state)])
        return self.logits(hidden[:, -1:])[:, 0], state

    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """One decoding step. tokens: (B,) or (B, 1). Returns (B, V) logits for the next position."""
        return self.logits(self._step_hidden(tokens.reshape(-1, 1), state))[:, 0]

    @torch.no_grad()
    def generate(
        self,
        text: Tensor,
        text_mask: Tensor,
        n_frames: int,
        *,
        top_k: int = 250,
        top_p: float = 0.0,
        temperature: float = 1.0,
        cfg_scale: float = 3.0,
        seed: int | None = None,
        use_cache: bool = True,
        compile: bool = False,
    ) -> Tensor:
        """Sample `n_frames` codebook-0 tokens per caption.

        The text is prefilled once; then each token costs one recurrent step (SiMBA) or one KV-cache step
        (Transformer). With cfg_scale != 1 the conditional and unconditional streams run as one batch.
        `use_cache=False` recomputes the whole sequence for every token (the paper code's method; kept as
        the reference and benchmark baseline). `compile=True` decodes with `modeling.compiled.compiled_step`
        (attention-free SiMBA; the first call per model and batch size pays the compilation). On the CPU the
        weights and the decoding state go onto huge pages in `prefill` (`modeling.pages`).

        Returns:
            (B, n_frames) long tokens in [0, pad_id).
        """
        was_training = self.training
        self.eval()
        try:
            B = text.shape[0]
            use_cfg = cfg_scale != 1.0
            if use_cfg:
                text, text_mask = with_null_condition(text, text_mask)
            device = text.device
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
            seq = torch.full((text.shape[0], 1), self.pad_id, dtype=torch.long, device=device)  # BOS

            def next_token(logits: Tensor) -> Tensor:
                logits = logits.float()
                if use_cfg:
                    logits = cfg_combine(logits[:B], logits[B:], cfg_scale)
                logits[:, self.pad_id] = float("-inf")  # BOS/pad is never a frame
                tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                return torch.cat([tok, tok]) if use_cfg else tok

            out = []
            if use_cache:
                step = self.step
                if compile:
                    step = compiled_step(self)
                logits, state = self.prefill(seq, text, text_mask, max_len=n_frames + 1)
                for i in range(n_frames):
                    tok = next_token(logits)
                    out.append(tok[:B])
                    if i + 1 < n_frames:
                        logits = step(tok, state)
            else:
                for _ in range(n_frames):
                    logits = self.logits(self._hidden(seq, text, text_mask, None)[:, -1])
                    tok = next_token(logits)
                    out.append(tok[:B])
                    seq = torch.cat([seq, tok[:, None]], dim=1)
            return torch.stack(out, dim=1)
        finally:
            self.train(was_training)

    # --- introspection used by `simba-ttm info` and the optimizer -------------------------------------
    def no_weight_decay_names(self) -> set[str]:
        """Parameters exempt from weight decay: norms, biases, embeddings, and Mamba-2's A_log / D / dt_bias."""
        names = set()
        for name, p in self.named_parameters():
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            module = self.get_submodule(module_name) if module_name else self
            if (
                p.ndim < 2
                or getattr(p, "_no_weight_decay", False)
                or isinstance(module, (nn.Embedding, nn.LayerNorm, RMSNorm))
            ):
                names.add(name)
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        no_decay = self.no_weight_decay_names()
        decay = [p for n, p in self.named_parameters() if n not in no_decay and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if n in no_decay and p.requires_grad]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def shift_left(text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded text -> left-padded text (real frames end at the last column).

    Args:
        text: (B, S, C); text_mask: (B, S) bool with each row's True values first.
    Returns:
        (text, mask) of the same shapes, each row rolled right by its number of padding frames.
    """
    S = text.shape[1]
    lengths = text_mask.sum(1)  # (B,)
    expected = torch.arange(S, device=text.device)[None] < lengths[:, None]
    if not torch.equal(expected, text_mask):
        raise ValueError("text_mask must be right-padded: each row's real frames must come first")
    pad = S - lengths  # (B,)
    src = (torch.arange(S, device=text.device)[None] - pad[:, None]) % S  # (B, S)
    shifted = torch.gather(text, 1, src[..., None].expand(-1, -1, text.shape[-1]))
    mask = torch.arange(S, device=text.device)[None] >= pad[:, None]
    return shifted, mask
