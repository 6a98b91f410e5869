"""The one place where configuration becomes modules. Model constructors never see a config object."""

from __future__ import annotations

from configs.schema import ModelConfig
from modeling.lm import TextToMusicLM
from modeling.simba import PrefixSiMBA
from modeling.transformer import CrossTransformer


def model_kwargs(cfg: ModelConfig) -> dict:
    """Constructor keyword arguments of `cfg.arch` (exposed so checkpoints can store them)."""
    common = dict(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        text_dim=cfg.text_dim,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        n_heads=cfg.n_heads,
        cond_dropout=cfg.cond_dropout,
        norm_eps=cfg.norm_eps,
    )
    if cfg.arch == "transformer":
        return common
    return dict(
        common,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        expand=cfg.expand,
        headdim=cfg.headdim,
        ngroups=cfg.ngroups,
        chunk_size=cfg.chunk_size,
        attn_layers=tuple(cfg.attn_layers),
    )


ARCHITECTURES: dict[str, type[TextToMusicLM]] = {"simba": PrefixSiMBA, "transformer": CrossTransformer}


def build_model(cfg: ModelConfig) -> TextToMusicLM:
    """Build the decoder `cfg.arch` names. Use `with torch.device("meta"):` to count without allocating."""
    return ARCHITECTURES[cfg.arch](**model_kwargs(cfg))
