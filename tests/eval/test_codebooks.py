"""`simba-ttm codebooks` (Fig. 1) on the tiny eval set with the tiny DAC and CLAP, and decoding from k codebooks."""

from __future__ import annotations

import csv

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from eval.clap import Clap, clap_score
from eval.fad import fad, fad_embedder
from modeling.pretrained.codec import decode_codes, load_codec
from pipelines.preprocess.evalset import read_evalset
from ray_jobs import codebooks as job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec(tiny_pretrained):
    return load_codec(tiny_pretrained["codec"])


def test_decoding_all_codebooks_equals_dacs_own_reconstruction(codec, tiny_evalset):
    audio = torch.from_numpy(read_evalset(tiny_evalset).audio[:2, :22050])[:, None]  # (2, 1, T): 0.5 s each
    with torch.inference_mode():
        z, codes, *_ = codec.encode(codec.preprocess(audio, codec.sample_rate))  # DAC's quantized latent, all 9
        want = codec.decode(z)[:, 0].numpy()  # (2, T')
    got = decode_codes(codec, codes.numpy().astype(np.int16), n_codebooks=9)
    print(f"max |decode_codes - DAC decode| = {np.abs(got - want).max():.3g} (peak {np.abs(want).max():.3g})")
    assert got.shape == want.shape == (2, codes.shape[-1] * codec.hop_length)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # unbatched, and None = all: the same up to float rounding (batched convolutions may sum in another order)
    np.testing.assert_allclose(decode_codes(codec, codes[0].numpy()), got[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_decoding_k_codebooks_reads_only_the_first_k(codec, tiny_evalset, k):
    codes = read_evalset(tiny_evalset, limit=1).codes[0][:, :40]  # (9, 40): 0.46 s
    base = decode_codes(codec, codes, n_codebooks=k)
    rng = np.random.default_rng(k)
    later = codes.copy()
    later[k:] = rng.integers(0, 1024, later[k:].shape)  # every codebook from k + 1 on
    np.testing.assert_array_equal(decode_codes(codec, later, n_codebooks=k), base)
    kth = codes.copy()
    kth[k - 1] = (kth[k - 1] + 1 + rng.integers(0, 1023, kth.shape[1])) % 1024  # codebook k itself: every frame
    assert np.abs(decode_codes(codec, kth, n_codebooks=k) - base).max() > 1e-4


def test_decode_codes_refuses_a_count_outside_the_codebooks(codec):
    codes = np.zeros((9, 4), dtype=np.int16)
    for bad in (0, 10):
        with pytest.raises(ValueError, match="n_codebooks must be in 1..9"):
            decode_codes(codec, codes, n_codebooks=bad)


def test_codebooks_job_writes_and_logs_k_1_to_9(tiny_pretrained, tiny_eval, tiny_evalset, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"preprocess.codec={tiny_pretrained['codec']}",
        f"eval.clap={tiny_eval['clap']}",
        "eval.fad_embedder=clap",
        f"eval.set_dir={tiny_evalset}",
        f"mlflow.tracking_uri={uri}",
    ]
    out = tmp_path / "fig1"
    # 4 captions of 2 tracks: each distinct clip is decoded 9 times and CLAP-embedded 10 times, so fewer is faster
    assert job.main(["--config", "debug", *overrides, "--limit", "4", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not meaningful" in printed

    with (out / job.CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["k", "fad", "clap", "clap_reference"]
    assert [int(r["k"]) for r in rows] == list(range(1, 10))
    fads, claps = [float(r["fad"]) for r in rows], [float(r["clap"]) for r in rows]
    assert all(np.isfinite(fads)) and all(np.isfinite(claps))

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simba-ttm").experiment_id])
    assert run.data.tags["simba_ttm.kind"] == "codebooks"
    for key, values in (("codebooks/fad", fads), ("codebooks/clap", claps)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == list(zip(range(1, 10), values, strict=True)), key
    (reference,) = client.get_metric_history(run.info.run_id, "codebooks/clap_reference")
    assert {float(r["clap_reference"]) for r in rows} == {reference.value}
    assert run.data.params["n_captions"] == "4" and run.data.params["n_clips"] == "2"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {job.PNG, job.CSV}
    image = matplotlib.image.imread(out / job.PNG)
    assert 300 <= image.shape[0] <= 600 and 800 <= image.shape[1] <= 1200

    # The same numbers by the library's own FAD and CLAP score, clip by clip (k = 9 and the references).
    evalset = read_evalset(tiny_evalset, limit=4)
    codec, clap = load_codec(tiny_pretrained["codec"]), Clap(tiny_eval["clap"])
    sr, n = evalset.sample_rate, evalset.audio.shape[1]
    distinct = [0, 2]  # one row per track (rows 2i and 2i + 1 share a clip)
    decoded = decode_codes(codec, np.stack([evalset.codes[i] for i in distinct]), n_codebooks=9)[:, :n]
    want_fad = fad(fad_embedder("clap", clap=clap), decoded, evalset.audio[distinct], sr)
    assert fads[8] == pytest.approx(want_fad, rel=1e-6, abs=1e-9)
    want_clap = clap_score(clap, np.repeat(decoded, 2, axis=0), sr, evalset.captions).score
    assert claps[8] == pytest.approx(want_clap, abs=1e-6)
    assert reference.value == pytest.approx(clap_score(clap, evalset.audio, sr, evalset.captions).score, abs=1e-6)


def test_codebooks_job_errors_clearly(tiny_pretrained, tiny_eval, tiny_evalset, tmp_path, capsys):
    base = ["--config", "debug", f"preprocess.codec={tiny_pretrained['codec']}", f"eval.clap={tiny_eval['clap']}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert job.main([*base[2:], "--evalset", str(tmp_path / "nowhere")]) == 2  # --config is optional (defaults)
    assert "make-evalset" in capsys.readouterr().err
    assert job.main([*base, "--evalset", str(tiny_evalset), "--limit", "1"]) == 2  # one clip: no CLAP covariance
    assert "at least 2 distinct reference clips" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
