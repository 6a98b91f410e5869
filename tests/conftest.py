"""Shared fixtures: tiny models of both architectures, built through the same builder as production."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from configs.schema import ModelConfig  # noqa: E402
from modeling.builders import build_model  # noqa: E402

TEXT_DIM = 12

TINY = dict(
    d_model=32, n_layers=2, text_dim=TEXT_DIM, mlp_dim=64, n_heads=4, d_state=16, headdim=8, chunk_size=8, dropout=0.0
)

# name -> ModelConfig overrides; "hybrid" is SiMBA with its second layer turned into attention.
ARCHS = {
    "simba": dict(arch="simba"),
    "transformer": dict(arch="transformer"),
    "hybrid": dict(arch="simba", attn_layers=[1]),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **ARCHS[name], **overrides})
    return build_model(cfg).eval()


def random_text(lengths: list[int], dim: int = TEXT_DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random caption features with the given real lengths. Returns (text, mask)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    text = torch.randn(len(lengths), S, dim, generator=g)
    mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]
    return text * mask[..., None], mask


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole test session (ray.init costs seconds).

    4 logical CPUs on a 2-core machine: a second multi-worker job can deadlock with exactly 2.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> dict[str, str]:
    """Tiny random DAC, Flan-T5 and HTDemucs saved in their libraries' own formats."""
    from modeling.tiny import make_tiny_pretrained

    return make_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))
