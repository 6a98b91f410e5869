"""Scoring: per-clip evidence reduces to the numbers the metric functions give on their own, in-process and on Ray."""

from __future__ import annotations

import numpy as np
import pytest

from configs.schema import EvalConfig
from eval.clap import clap_score
from eval.fad import fad, fad_embedder
from eval.kld import passt_kld
from eval.scoring import ClipScorer, evidence_in_process, evidence_on_ray, set_metrics
from pipelines.preprocess.evalset import read_evalset


@pytest.fixture(scope="module")
def scorer(tiny_eval):
    return ClipScorer(EvalConfig(clap=tiny_eval["clap"], passt=tiny_eval["passt"], fad_embedder="clap", seconds=1.5))


@pytest.fixture(scope="module")
def clips(tiny_evalset):
    s = read_evalset(tiny_evalset)
    rng = np.random.default_rng(1)
    # "generated": the references, shuffled, with noise: paired with the wrong captions, so the numbers differ
    generated = s.audio[rng.permutation(len(s))] + 0.05 * rng.standard_normal(s.audio.shape).astype(np.float32)
    return s, generated.astype(np.float32)


def test_set_metrics_equal_the_metric_functions(scorer, clips):
    s, generated = clips
    n = int(1.5 * s.sample_rate)
    gen_ev = evidence_in_process(scorer, generated, s.sample_rate, s.captions, batch_size=4)
    ref_ev = evidence_in_process(scorer, s.audio, s.sample_rate, batch_size=4)
    got = set_metrics(gen_ev, ref_ev)

    g, r = generated[:, :n], s.audio[:, :n]
    k = passt_kld(scorer.passt, g, r, s.sample_rate)
    want = {
        "eval/fad": fad(fad_embedder("clap", clap=scorer.clap), g, r, s.sample_rate),
        "eval/kld": k.kld,
        "eval/kld_reverse": k.kld_reverse,
        "eval/clap": clap_score(scorer.clap, g, s.sample_rate, s.captions).score,
    }
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["eval/kld"] > 1e-4 and got["eval/fad"] > 0  # the shuffled set is not the reference


def test_references_against_themselves(scorer, clips):
    s, _ = clips
    ev = evidence_in_process(scorer, s.audio, s.sample_rate, s.captions, batch_size=4)
    m = set_metrics(ev, ev)
    assert m["eval/clap_reference"] == pytest.approx(m["eval/clap"])
    assert abs(m["eval/kld"]) < 527e-6 and abs(m["eval/kld_reverse"]) < 527e-6
    assert m["eval/fad"] == pytest.approx(0.0, abs=1e-6)


def test_a_clips_evidence_does_not_depend_on_its_batch(scorer, clips):
    s, generated = clips
    one = evidence_in_process(scorer, generated, s.sample_rate, s.captions, batch_size=1)
    all_ = evidence_in_process(scorer, generated, s.sample_rate, s.captions, batch_size=6)
    np.testing.assert_allclose(one.probs, all_.probs, atol=1e-6)
    np.testing.assert_allclose(one.frames, all_.frames, atol=1e-5)
    np.testing.assert_allclose(one.clap, all_.clap, atol=1e-6)


def test_the_ray_actor_pool_gives_the_in_process_evidence(scorer, clips, ray_session):
    s, generated = clips
    sets = [generated, s.audio, generated[::-1].copy()]
    remote = evidence_on_ray(scorer.cfg, sets, s.sample_rate, s.captions, actors=2)
    assert len(remote) == 3
    for audio, got in zip(sets, remote, strict=True):
        local = evidence_in_process(scorer, audio, s.sample_rate, s.captions)
        np.testing.assert_allclose(got.probs, local.probs, atol=1e-6)
        np.testing.assert_allclose(got.frames, local.frames, atol=1e-5)
        np.testing.assert_allclose(got.clap, local.clap, atol=1e-6)
    assert set_metrics(remote[0], remote[0])["eval/fad"] == pytest.approx(0.0, abs=1e-6)
