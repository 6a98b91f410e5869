"""Evaluation tests run offline: weight caches point at empty temporary folders and internet sockets fail."""

from __future__ import annotations

import pytest

from tests.conftest import go_offline


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Empty torch hub and Hugging Face caches, hub offline, and no internet connections."""
    go_offline(monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory) -> dict[str, str]:
    """Tiny random CLAP and PaSST saved in their libraries' formats (eval/tiny.py)."""
    from eval.tiny import make_tiny_eval_models

    return make_tiny_eval_models(tmp_path_factory.mktemp("eval_models"))
