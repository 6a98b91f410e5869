"""Checkpoints, generation to audio files, and `simba-ttm generate`: real files, tiny random models.

The tiny DAC and T5 are saved in their libraries' own formats and loaded by the production loaders; the LM is
the debug config shrunk further, saved and loaded through `pipelines.train.checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from configs import ExperimentConfig, load_config
from eval.plots import spectrogram_png
from modeling.builders import build_model
from modeling.pretrained.codec import load_codec
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.generation import Sample, generate_audio, slugify, write_samples
from pipelines.train.checkpoints import MODEL_FILE, find_checkpoint, load_model, save_model
from ray_jobs.generate import main

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),  # audiotools' docstrings
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),  # dac uses the old weight_norm
]

SR = 44100
HOP = 512
SMALL = ["model.d_model=32", "model.mlp_dim=64", "model.headdim=8", "model.chunk_size=16", "model.dropout=0.0"]
CAPTIONS = ["A happy rock song with loud electric guitar and drums.", "calm piano", "slow ambient pads, warm bass"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(pretrained: dict[str, str], *overrides: str) -> ExperimentConfig:
    paths = [f"preprocess.codec={pretrained['codec']}", f"preprocess.text_encoder={pretrained['text_encoder']}"]
    return load_config("debug", [*SMALL, *paths, *overrides])


def tiny_lm(cfg: ExperimentConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model).eval()


@pytest.fixture(scope="module")
def cfg(tiny_pretrained) -> ExperimentConfig:
    return tiny_config(tiny_pretrained)


@pytest.fixture(scope="module")
def model(cfg):
    return tiny_lm(cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, cfg) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "checkpoint_000000", model, cfg, step=7)


@pytest.fixture(scope="module")
def text_encoder(tiny_pretrained) -> TextEncoder:
    return TextEncoder(tiny_pretrained["text_encoder"])


@pytest.fixture(scope="module")
def codec(tiny_pretrained):
    return load_codec(tiny_pretrained["codec"])


def batch_for(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.pad_id, (2, 12), generator=g)
    tokens[:, 0] = model.pad_id
    text = torch.randn(2, 5, model.text_dim, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([[5], [3]])
    return tokens, text * mask[..., None], mask


# --- checkpoints -------------------------------------------------------------------------------------


def test_save_load_round_trip(checkpoint, model, cfg):
    assert checkpoint.name == MODEL_FILE
    assert [p.name for p in checkpoint.parent.iterdir()] == [MODEL_FILE]  # no temporary file left behind
    loaded, loaded_cfg, step = load_model(checkpoint)
    assert step == 7 and loaded_cfg == cfg and not loaded.training
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    tokens, text, mask = batch_for(model)
    assert torch.equal(model(tokens, text, mask).logits, loaded(tokens, text, mask).logits)


def test_load_from_directory_and_run_folder(tmp_path, cfg, model):
    # Name order disagrees with step order: the step stored in the file decides.
    save_model(tmp_path / "run" / "checkpoint_b", model, cfg, step=5)
    newer = tiny_lm(cfg, seed=1)
    save_model(tmp_path / "run" / "checkpoint_a", newer, cfg, step=10)
    (tmp_path / "run" / ".staging").mkdir()  # hidden folders (partial writes) are never picked
    save_model(tmp_path / "run" / ".staging", model, cfg, step=99)

    _, _, step = load_model(tmp_path / "run" / "checkpoint_b")
    assert step == 5
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint_a" / MODEL_FILE
    loaded, _, step = load_model(tmp_path)  # two levels up works too
    assert step == 10
    assert torch.equal(loaded.head.weight, newer.head.weight)


def test_a_folder_of_several_runs_is_refused_not_resolved_to_one(tmp_path, cfg, model):
    """`generate --checkpoint runs/debug` took the highest step among every run below it, silently."""
    for name, step in (("a", 5), ("b", 10)):
        (tmp_path / name).mkdir()
        cfg.dump_yaml(tmp_path / name / "config.yaml")
        save_model(tmp_path / name / "checkpoint_000000", model, load_config("debug", [*SMALL, f"name={name}"]), step)
    for pick in ("last", "best"):
        with pytest.raises(ValueError, match=r"holds the checkpoints of 2 runs; pass one run's folder") as e:
            find_checkpoint(tmp_path, pick=pick)
    assert f"{tmp_path / 'a'}: a (1 checkpoints)" in str(e.value)
    assert find_checkpoint(tmp_path / "b").parent.parent == tmp_path / "b"


def test_missing_checkpoint_names_what_was_searched(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoint_000001").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty.*model\.pt"):
        load_model(tmp_path / "empty")


class Payload:
    """Pickles as a call to Path.touch: unpickling it without weights_only runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_runs_code(tmp_path, model, cfg):
    marker = tmp_path / "code-ran"
    bad = tmp_path / MODEL_FILE
    payload = {"format": 1, "model": model.state_dict(), "config": cfg.to_dict(), "step": 1, "x": Payload(marker)}
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="refusing to load"):
        load_model(bad)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the file really carries code: a plain load runs it
    assert marker.exists()


def test_not_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / MODEL_FILE)
    with pytest.raises(ValueError, match="not a simba-ttm checkpoint"):
        load_model(tmp_path)


# --- generation --------------------------------------------------------------------------------------


def test_generate_audio_shapes_and_seeds(model, text_encoder, codec):
    kw = dict(text_encoder=text_encoder, codec=codec, n_frames=9, top_k=50, batch_size=2)
    samples = generate_audio(model, CAPTIONS, seed=0, **kw)  # 3 captions in batches of 2 and 1
    assert [s.caption for s in samples] == CAPTIONS
    for s in samples:
        assert s.tokens.shape == (9,) and s.tokens.min() >= 0 and s.tokens.max() < 1024
        assert s.audio.dtype == np.float32 and s.audio.shape == (9 * HOP,)
        assert s.sample_rate == SR and s.wav is None and s.png is None
        assert np.isfinite(s.audio).all()
    again = generate_audio(model, CAPTIONS, seed=0, **kw)
    pairs = zip(samples, again, strict=True)
    assert all(np.array_equal(a.tokens, b.tokens) and np.array_equal(a.audio, b.audio) for a, b in pairs)
    other = generate_audio(model, CAPTIONS, seed=1, **kw)
    assert not all(np.array_equal(a.tokens, b.tokens) for a, b in zip(samples, other, strict=True))


def test_text_width_mismatch_is_a_clear_error(tiny_pretrained, text_encoder, codec):
    wide = tiny_lm(tiny_config(tiny_pretrained, "model.text_dim=768"))
    with pytest.raises(ValueError, match=r"expects 768-d text \(Flan-T5 Base\) but the text encoder gives 32-d"):
        generate_audio(wide, ["calm piano"], text_encoder=text_encoder, codec=codec, n_frames=4)


def test_write_samples(tmp_path):
    rng = np.random.default_rng(0)
    quiet = (0.25 * np.sin(np.arange(4096) / 10)).astype(np.float32)
    loud = (3.0 * rng.standard_normal(8192)).astype(np.float32)
    tokens = np.zeros(8, dtype=np.int64)
    samples = [Sample("Calm piano, über-soft!", tokens, quiet, SR), Sample("x" * 100, tokens, loud, SR)]
    written = write_samples(samples, tmp_path / "out", prefix="step_000060")

    assert written[0].wav.name == "step_000060_00_calm-piano-uber-soft.wav"
    assert written[1].png.name == f"step_000060_01_{'x' * 40}.png"
    for s, original in zip(written, samples, strict=True):
        audio, sr = sf.read(s.wav, dtype="float32")
        assert sr == SR and audio.shape == original.audio.shape
        assert sf.info(s.wav).subtype == "PCM_16"
        assert np.abs(audio).max() <= 1.0
        assert s.png.read_bytes()[:8] == PNG_MAGIC and s.png.stat().st_size > 5000
    # quiet audio is written as is; audio beyond full scale is scaled to peak 1 rather than clipped
    np.testing.assert_allclose(sf.read(written[0].wav, dtype="float32")[0], quiet, atol=1 / 32768)
    loud_back = sf.read(written[1].wav, dtype="float32")[0]
    np.testing.assert_allclose(loud_back, loud / np.abs(loud).max(), atol=1 / 32768)

    index = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert [(e["caption"], e["wav"], e["png"]) for e in index] == [(s.caption, s.wav.name, s.png.name) for s in written]
    write_samples(samples[:1], tmp_path / "out", prefix="other")  # a second prefix adds to the index
    assert len(json.loads((tmp_path / "out" / "prompts.json").read_text())) == 3


def test_slugify():
    assert slugify("A happy ROCK song -- with drums!") == "a-happy-rock-song-with-drums"
    assert slugify("???") == "untitled"
    assert len(slugify("word " * 30)) <= 40 and not slugify("word " * 30).endswith("-")


@pytest.mark.parametrize("n", [0, 10, SR])
def test_spectrogram_of_silent_or_short_audio(tmp_path, n):
    path = spectrogram_png(np.zeros(n, dtype=np.float32), SR, tmp_path / "s.png", title="silence")
    assert path.read_bytes()[:8] == PNG_MAGIC


# --- simba-ttm generate ------------------------------------------------------------------------------


def test_cli_prompts_end_to_end(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint.parent), "--prompt", "calm piano", "--prompt", "loud drums"]
              + ["--seconds", "0.1", "--out", str(out), "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "step 7" in printed and "9 frames" in printed and "real-time factor" in printed
    assert "2/2 clips" in printed  # progress, batch by batch
    folder = out / "debug-step7"  # the run's name and the step
    wavs = sorted(folder.glob("*.wav"))
    assert [w.name for w in wavs] == ["sample_00_calm-piano.wav", "sample_01_loud-drums.wav"]
    assert all(sf.info(w).frames == 9 * HOP and sf.info(w).samplerate == SR for w in wavs)
    assert len(list(folder.glob("*.png"))) == 2
    assert "'calm piano' -> " in printed


def test_cli_prompts_file(tmp_path, checkpoint, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("calm piano\n\n  warm bass  \nfast techno beat\n\n")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint.parent.parent), "--prompts", str(prompts), "--out", str(out)]
              + ["--seconds", "0.05", "--batch-size", "2", "--top-k", "10", "--cfg", "1.5", "--seed", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    folder = out / "debug-step7"
    index = json.loads((folder / "prompts.json").read_text())
    assert [e["caption"] for e in index] == ["calm piano", "warm bass", "fast techno beat"]
    assert [e["wav"][:9] for e in index] == ["sample_00", "sample_01", "sample_02"]  # numbered across batches
    assert all((folder / e["wav"]).is_file() and (folder / e["png"]).is_file() for e in index)
    assert all(e["frames"] == 5 for e in index)  # ceil(0.05 s * 86.13 fps)
    # What made each clip: the checkpoint, its step and the sampling settings, and its batch's seed.
    assert [e["seed"] for e in index] == [3, 3, 4]
    assert {(e["checkpoint"], e["run"], e["step"]) for e in index} == {(str(checkpoint), "debug", 7)}
    assert index[0]["generation"] == {"seconds": 0.05, "top_k": 10, "top_p": 0.0, "temperature": 1.0,
                                      "cfg_scale": 1.5, "batch_size": 2, "compile": False}  # fmt: skip


def test_cli_never_overwrites_an_earlier_call(tmp_path, checkpoint, capsys):
    """The same checkpoint and prompt again (another seed, or the other decoder's run of the same name) used to
    overwrite the first call's clips and index: each call has its own folder now."""
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--prompt", "calm piano", "--seconds", "0.05", "--out", str(out)]
    assert main([*args, "--seed", "1"]) == 0
    first = (out / "debug-step7" / "sample_00_calm-piano.wav").read_bytes()
    assert main([*args, "--seed", "2"]) == 0
    assert (out / "debug-step7" / "sample_00_calm-piano.wav").read_bytes() == first
    second = json.loads((out / "debug-step7-2" / "prompts.json").read_text())
    assert [e["seed"] for e in second] == [2]
    assert f"-> {out / 'debug-step7-2'}" in capsys.readouterr().out


def test_cli_compiled_decoding_writes_the_same_audio(tmp_path, checkpoint, capsys):
    audio = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag.strip("-")
        rc = main(["--checkpoint", str(checkpoint), "--prompt", "calm piano", "--seconds", "0.1"]
                  + ["--out", str(out), "--device", "cpu", flag])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        audio[flag] = sf.read(out / "debug-step7" / "sample_00_calm-piano.wav")[0]
    assert np.array_equal(audio["--no-compile"], audio["--compile"])


def test_cli_errors_return_2(tmp_path, checkpoint, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "calm piano"]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = ["--checkpoint", str(checkpoint), "--prompt", "calm piano", "--out", str(tmp_path / "o")]
    assert main([*args, "--text-encoder", str(tmp_path / "no_t5")]) == 2
    err = capsys.readouterr().err
    assert "Flan-T5 weights not found" in err and "--text-encoder" in err
    assert main([*args, "--top-p", "2"]) == 2
    assert "generation.top_p" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["--checkpoint", str(checkpoint), "--prompt", "calm piano", "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 jazz\n".encode("latin-1"))
    assert main(["--checkpoint", str(checkpoint), "--prompts", str(latin1), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read --prompts (a UTF-8 text file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
