"""The analytic FLOP count of `simba-ttm info` and the training MFU, against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling.summary import matmul_flops_per_sample
from tests.conftest import random_text, tiny_model


@pytest.mark.parametrize("arch", ["simba", "transformer", "hybrid"])
def test_matmul_flops_match_torch_flop_counter(arch):
    """Every Linear is a (add)mm in the forward: their FLOPs as counted by torch equal the analytic count, which
    applies the caption-only weights (text projection, cross-attention K/V) to the caption's tokens only."""
    model = tiny_model(arch)
    B, T, S = 2, 20, 7
    text, mask = random_text([S, S])
    tokens = torch.randint(0, 1000, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(tokens, text, mask)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    measured = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    seq_len = T + (0 if arch == "transformer" else S)  # SiMBA's positions include the caption prefix
    assert B * matmul_flops_per_sample(model, seq_len, S) == measured
