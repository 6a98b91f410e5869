"""Evaluation tests run offline: weight caches point at empty temporary folders and internet sockets fail."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Empty torch hub and Hugging Face caches, hub offline, and no internet connections."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; transformers looks them up per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert torch.hub.get_dir().startswith(str(tmp_path))

    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory) -> dict[str, str]:
    """Tiny random CLAP and PaSST saved in their libraries' formats (eval/tiny.py)."""
    from eval.tiny import make_tiny_eval_models

    return make_tiny_eval_models(tmp_path_factory.mktemp("eval_models"))
