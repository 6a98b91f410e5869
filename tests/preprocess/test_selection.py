"""Clip selection (one clip per track) and the token/reject Parquet format, without Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.preprocess.captions import FileCaptioner, TagCaptioner
from pipelines.preprocess.jamendo import Reject, Track
from pipelines.preprocess.selection import choose_captioned, select_clip
from pipelines.preprocess.tokens import (
    TOKENS_SCHEMA,
    finished_track_ids,
    read_parts,
    rejects_table,
    split_of,
    tokens_table,
    write_part,
)

SR = 1000  # a low rate keeps the clips tiny; the rules are rate-independent
CLIP = 30 * SR


def _track(tags=("genre---rock", "instrument---piano"), track_id="track_0000001") -> Track:
    return Track(track_id, "artist_000001", "album_000001", "01/1.mp3", 120.0, list(tags))


def _clips(kinds: str) -> list[tuple[float, np.ndarray]]:
    """'lsl' -> loud, silent, loud clips of 30 s (a silent clip is all zeros)."""
    rng = np.random.default_rng(0)
    return [(30.0 * i, (rng.standard_normal(CLIP) * 0.1 if k == "l" else np.zeros(CLIP)).astype(np.float32))
            for i, k in enumerate(kinds)]  # fmt: skip


def _select(track, clips, seed=0, captioner=None, separate=lambda x: x):
    captioner = captioner or TagCaptioner()
    return select_clip(track, clips, separate=separate, captioner=captioner, sample_rate=SR, seed=seed)


def test_keeps_a_surviving_clip_and_records_the_dropped_ones():
    for seed in range(10):
        sel = _select(_track(), _clips("slsl"), seed=seed)
        assert sel.track_reject is None
        assert sel.clip_start in (30.0, 90.0)
        assert sel.audio.shape == (CLIP,) and sel.caption
        assert all(r.stage == "silence" and start in (0.0, 60.0) for start, r in sel.clip_rejects)


def test_pick_is_uniform_over_survivors_and_seeded():
    picks = Counter(_select(_track(), _clips("slsll"), seed=s).clip_start for s in range(300))
    assert set(picks) == {30.0, 90.0, 120.0}
    assert min(picks.values()) > 70  # ~100 each
    assert _select(_track(), _clips("llll"), seed=5).clip_start == _select(_track(), _clips("llll"), seed=5).clip_start


def test_all_silent_rejects_the_track_with_every_clip_reason():
    sel = _select(_track(), _clips("sss"))
    assert sel.track_reject.stage == "silence"
    assert "no clip survived (3 clips: 3 silence)" in sel.track_reject.reason
    assert len(sel.clip_rejects) == 3 and sel.audio is None


def test_vocal_tags_reject_before_any_separation():
    calls = []
    sel = _select(_track(tags=("genre---pop", "instrument---voice")), _clips("ll"), separate=calls.append)
    assert sel.track_reject.stage == "vocal_filter" and "vocal" in sel.track_reject.reason
    assert calls == []


def test_missing_file_caption_rejects_the_track(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"track_id": "track_0000002", "caption": "calm piano"}\n')
    sel = _select(_track(), _clips("l"), captioner=FileCaptioner(path))
    assert sel.track_reject.stage == "caption"
    ok = _select(_track(track_id="track_0000002"), _clips("l"), captioner=FileCaptioner(path))
    assert ok.caption == "calm piano"


def test_clip_captions_are_checked_before_separation(tmp_path):
    """A clip whose file caption is missing or mentions vocals is dropped without separating it; the kept clip
    carries its own clip-level caption."""
    path = tmp_path / "captions.csv"
    path.write_text(
        "track_id,clip_start,caption\n1,0,A choir over organ\n1,30,Calm piano\n1,60,Fast drums\n"  # 90: none
    )
    separated = []

    def separate(x):
        separated.append(x)
        return x

    picks = set()
    for seed in range(12):
        separated.clear()
        sel = _select(_track(), _clips("llll"), seed=seed, captioner=FileCaptioner(path), separate=separate)
        assert sel.track_reject is None and sel.caption == {30.0: "Calm piano", 60.0: "Fast drums"}[sel.clip_start]
        assert len(separated) == 1  # only the kept clip was separated
        stages = {start: r.stage for start, r in sel.clip_rejects}
        assert set(stages.items()) <= {(0.0, "vocal_filter"), (90.0, "caption")}
        picks.add(sel.clip_start)
    assert picks == {30.0, 60.0}


def test_model_captions_get_the_first_surviving_candidates():
    sel = select_clip(_track(), _clips("slsll"), separate=lambda x: x, captioner=None, sample_rate=SR, seed=0,
                      candidates=2)  # fmt: skip
    assert sel.track_reject is None and sel.caption is None and len(sel.candidates) == 2
    order = [s for s, _ in sel.clip_rejects] + [s for s, _ in sel.candidates]
    assert all(r.stage == "silence" for _, r in sel.clip_rejects)
    assert {s for s, _ in sel.candidates} <= {30.0, 90.0, 120.0} and len(set(order)) == len(order)
    none = select_clip(_track(), _clips("ss"), separate=lambda x: x, captioner=None, sample_rate=SR, seed=0)
    assert none.track_reject.stage == "silence" and not none.candidates


def test_choose_captioned_keeps_the_first_caption_without_vocal_cues():
    earlier = [(0.0, Reject("track_0000001", "silence", "clip at 0 s ..."))]
    sel = choose_captioned(
        "track_0000001", [(30.0, "A female singer over piano"), (60.0, "  "), (90.0, "Calm piano")],
        earlier_rejects=earlier,
    )  # fmt: skip
    assert (sel.clip_start, sel.caption) == (90.0, "Calm piano") and sel.track_reject is None
    assert [(s, r.stage) for s, r in sel.clip_rejects] == [(0.0, "silence"), (30.0, "vocal_filter"), (60.0, "caption")]
    out = choose_captioned("track_0000001", [(30.0, "rap over beats")], earlier_rejects=earlier)
    assert out.track_reject.stage == "selection" and "2 clips" in out.track_reject.reason
    out = choose_captioned("track_0000001", [(30.0, "a kazoo solo")], vocal_words=("kazoo",))
    assert out.track_reject.stage == "vocal_filter"
    # A caption model that failed on a clip: its error is the clip's reject reason, so the rejects table says why.
    failed = "the audio captioner failed: RuntimeError: CUDA out of memory"
    out = choose_captioned("track_0000001", [(30.0, None), (60.0, "")], failures={30.0: failed})
    assert [(s, r.reason) for s, r in out.clip_rejects] == [
        (30.0, f"clip at 30 s: {failed}"),
        (60.0, "the caption model gave no text for clip at 60 s"),
    ]


def test_separation_failure_drops_the_clip_not_the_track():
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return x

    sel = _select(_track(), _clips("ll"), separate=flaky)
    assert sel.track_reject is None
    assert [r.stage for _, r in sel.clip_rejects] == ["separation"]


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: an illegal memory access"),
              MemoryError()],
)  # fmt: skip
def test_the_machines_errors_are_raised_not_recorded(error):
    """Out of memory is no verdict on the clip: recorded, the track would count as finished and never be retried."""

    def failing(x):
        raise error

    with pytest.raises(type(error)):
        _select(_track(), _clips("ll"), separate=failing)


def test_vocals_removed_audio_is_what_is_kept():
    sel = _select(_track(), _clips("l"), separate=lambda x: x * 0.5)
    np.testing.assert_allclose(sel.audio, _clips("l")[0][1] * 0.5)


def _token_row(track_id: str, frames: int = 7, text_len: int = 3) -> dict:
    rng = np.random.default_rng(len(track_id) + frames)
    return dict(
        track_id=track_id, artist_id="artist_000001", clip_start=30.0, caption="a calm piano piece",
        codes=rng.integers(0, 1024, (9, frames)).astype(np.int16), n_frames=frames,
        text_emb=rng.standard_normal((text_len, 4)).astype(np.float16), text_len=text_len, split="train",
    )  # fmt: skip


def test_token_parts_round_trip(tmp_path):
    rows = [_token_row("track_0000001", 7, 3), _token_row("track_0000002", 5, 2)]
    path = write_part(tokens_table(rows), tmp_path / "tokens")
    table = read_parts(tmp_path / "tokens")
    assert path.name.startswith("part-") and table.schema.equals(TOKENS_SCHEMA)
    for row, got in zip(rows, table.to_pylist(), strict=True):
        codes = np.asarray(got["codes"], dtype=np.int16)
        emb = np.asarray(got["text_emb"], dtype=np.float16)
        assert codes.shape == (9, row["n_frames"]) and np.array_equal(codes, row["codes"])
        assert emb.shape == (row["text_len"], 4) and np.array_equal(emb, row["text_emb"])
    assert write_part(rejects_table([]), tmp_path / "rejects") is None


def test_half_written_parts_are_ignored_and_outcomes_are_found(tmp_path):
    write_part(tokens_table([_token_row("track_0000001")]), tmp_path / "tokens")
    (tmp_path / "tokens" / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half a file")
    write_part(
        rejects_table([
            dict(track_id="track_0000002", stage="decode", reason="corrupt", clip_start=None),
            dict(track_id="track_0000003", stage="silence", reason="clip at 0 s ...", clip_start=0.0),
        ]),
        tmp_path / "rejects",
    )  # fmt: skip
    # track 3 only lost one clip: it is not finished
    assert finished_track_ids(tmp_path / "tokens", tmp_path / "rejects") == {"track_0000001", "track_0000002"}
    assert finished_track_ids(tmp_path / "none", tmp_path / "none") == set()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_split_is_deterministic_and_proportional(fraction):
    ids = [f"track_{i:07d}" for i in range(2000)]
    splits = [split_of(t, fraction) for t in ids]
    assert splits == [split_of(t, fraction) for t in ids]
    assert abs(splits.count("val") / len(ids) - fraction) < 0.03
