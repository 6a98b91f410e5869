"""Shared fixtures: tiny models of both architectures, built through the same builder as production."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The compiled step's auto choice is kept in a file across processes: tests start from none, and leave $HOME alone.
os.environ["SIMBA_DECODE_STRATEGY_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="simba-strategy-"), "choices.json")
# The fused decoding kernel is built once per test session, into a temporary folder too.
os.environ["SIMBA_FUSED_CACHE"] = tempfile.mkdtemp(prefix="simba-fused-")

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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models decode
    fastest so; with more threads, hand-offs dominate (and stall on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


def start_local_ray():
    """A local Ray runtime for this test process (kept across modules: ray.init costs seconds).

    4 logical CPUs on a 2-core machine: a second multi-worker job can deadlock with exactly 2. address="local":
    always a new instance, never the cluster that a `ray start` elsewhere on the machine last recorded.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_session():
    """Ray for one test; a module that needs no other Ray instance around (job submission) shuts it down."""
    return start_local_ray()


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> dict[str, str]:
    """Tiny random DAC, Flan-T5 and HTDemucs saved in their libraries' own formats."""
    from modeling.pretrained.tiny import make_tiny_pretrained

    return make_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="session")
def tiny_captioners(tmp_path_factory) -> dict[str, str]:
    """Tiny random Qwen2-Audio (+ processor) and Llama (+ chat tokenizer), saved by `save_pretrained`; keyed like
    the preprocess config (caption_audio_model, caption_text_model)."""
    from modeling.pretrained.tiny import make_tiny_captioners

    return make_tiny_captioners(tmp_path_factory.mktemp("captioners"))


def preprocess_config(corpus, pretrained: dict[str, str], out: Path, *overrides: str):
    """The debug config pointed at a generated corpus, tiny models and an output folder."""
    from configs import load_config

    return load_config(
        "debug",
        [
            f"preprocess.metadata_tsv={corpus.tsv_path}",
            f"preprocess.audio_root={corpus.root / 'audio'}",
            f"preprocess.exclude_csv={corpus.sdd_csv_path}",
            "preprocess.captions=file",
            f"preprocess.caption_file={corpus.captions_path}",
            f"preprocess.separator={pretrained['separator']}",
            f"preprocess.codec={pretrained['codec']}",
            f"preprocess.text_encoder={pretrained['text_encoder']}",
            f"preprocess.rejects_dir={out / 'rejects'}",
            f"data.tokens_dir={out / 'tokens'}",
            "data.val_fraction=0.3",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small generated corpus in the Jamendo layout, with one example of every bad input."""
    from pipelines.preprocess.corpus.writer import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root, 8, bad=True, seed=3, min_seconds=31, max_seconds=64, progress=False)


@pytest.fixture(scope="session")
def preprocessed(corpus, tiny_pretrained, tmp_path_factory):
    """(config, summary) of one real preprocessing run (Ray Data, tiny real models) on `corpus`."""
    from pipelines.preprocess.graph import run_preprocess

    start_local_ray()
    cfg = preprocess_config(corpus, tiny_pretrained, tmp_path_factory.mktemp("preprocessed"))
    return cfg, run_preprocess(cfg)


EVALSET_CAPTIONS = (
    ("0000011", "A calm piano piece in C major."),
    ("0000011", "Slow solo piano, quiet and warm."),
    ("0000022", "Fast electronic track with a bright synthesizer lead."),
    ("0000022", "Energetic synth music with a steady pulse."),
    ("0000033", "A low drone with noisy percussion."),
    ("0000033", "Dark ambient textures over a low hum."),
)


@pytest.fixture(scope="session")
def tiny_evalset(tiny_pretrained, tmp_path_factory) -> Path:
    """An eval set of 6 captions over 3 synthesized tracks (2 s references, tiny DAC codes, tiny T5 features),
    written straight through `write_evalset_part`; make-evalset's own tests run the Ray pipeline."""
    import numpy as np

    from modeling.pretrained.codec import encode_codes, load_codec
    from modeling.pretrained.text_encoder import TextEncoder
    from pipelines.preprocess.evalset import write_evalset_part

    sr, n = 44100, 88200
    t = np.arange(n) / sr
    rng = np.random.default_rng(0)
    audio = {
        "0000011": 0.3 * np.sin(2 * np.pi * 261.6 * t) * np.exp(-(t % 0.5) * 4),
        "0000022": 0.2 * np.sign(np.sin(2 * np.pi * 880 * t)) * (np.sin(2 * np.pi * 4 * t) > 0),
        "0000033": 0.2 * np.sin(2 * np.pi * 55 * t) + 0.05 * rng.standard_normal(n),
    }
    audio = {k: v.astype(np.float32) for k, v in audio.items()}
    codec = load_codec(tiny_pretrained["codec"])
    codes = {k: encode_codes(codec, v) for k, v in audio.items()}
    emb, lengths = TextEncoder(tiny_pretrained["text_encoder"])([c for _, c in EVALSET_CAPTIONS])
    rows = [
        dict(
            index=i,
            caption_id=str(500 + i),
            track_id=track,
            caption=text,
            text_emb=emb[i, : lengths[i]],
            audio=audio[track],
            sample_rate=sr,
            codes=codes[track],
        )  # fmt: skip
        for i, (track, text) in enumerate(EVALSET_CAPTIONS)
    ]
    out = tmp_path_factory.mktemp("evalset")
    write_evalset_part(rows[:4], out)
    write_evalset_part(rows[4:], out)
    return out


def go_offline(monkeypatch, tmp_path) -> None:
    """Empty weight caches (HOME, torch hub, Hugging Face), the hub in offline mode, and no internet connection:
    for the autouse `offline` fixtures of the tests that load pretrained parts."""
    import socket

    import huggingface_hub.constants
    import torch

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # dac caches under ~/.cache/descript
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; transformers and hf_hub_download look them up per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert torch.hub.get_dir().startswith(str(tmp_path))

    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
