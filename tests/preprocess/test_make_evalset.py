"""make-evalset end to end: a Song Describer-layout CSV over the generated corpus -> Ray Data -> the eval set, with the
tiny real DAC and T5. One module fixture runs the pipeline once, into a folder that holds an earlier set."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from configs import ConfigError, load_config
from modeling.pretrained.codec import encode_codes, load_codec
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.preprocess.audio import load_audio, resample
from pipelines.preprocess.corpus.writer import SDD_HEADER
from pipelines.preprocess.evalset import PCM_SCALE, read_evalset, write_evalset_part
from pipelines.preprocess.make_evalset import (
    REJECTS_NAME,
    check_set_dir,
    decode_reference,
    read_evalset_csv,
    run_make_evalset,
)
from tests.conftest import start_local_ray

OFFSET, SECONDS = 10.5, 2.0  # the corpus's `short` track (12 s) ends before 10.5 + 2 s; every other one is >= 31 s
SR = 44100


def _write_csv(path: Path, rows: list[dict], header=SDD_HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, header, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _config(tiny_pretrained, csv_path: Path, audio_root: Path, set_dir: Path, *overrides: str):
    return load_config(
        "debug",
        [
            f"preprocess.codec={tiny_pretrained['codec']}",
            f"preprocess.text_encoder={tiny_pretrained['text_encoder']}",
            f"eval.set_csv={csv_path}",
            f"eval.set_audio_root={audio_root}",
            f"eval.set_dir={set_dir}",
            f"eval.reference_offset={OFFSET}",
            f"eval.seconds={SECONDS}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def made(corpus, tiny_pretrained, tmp_path_factory):
    """(csv rows, summary, set_dir): the corpus's own song_describer.csv (as make-corpus writes it) plus captions
    of a good track, of every kind of bad audio, and two bad rows; written over an earlier set in set_dir."""
    out = tmp_path_factory.mktemp("make_evalset")
    with corpus.sdd_csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "the corpus fixture should have Song Describer captions"
    good = corpus.ids("good")[0]

    def row(caption_id, kind_or_id, caption):
        track = corpus.track(corpus.ids(kind_or_id)[0] if kind_or_id in corpus.kinds.values() else kind_or_id)
        return dict(caption_id=caption_id, track_id=track.track_id, caption=caption, path=track.path)

    rows += [
        row("100", good, "A first caption of a good track, with a comma."),
        row("101", good, 'A second caption of it, "quoted", sharing its reference.'),
        row("102", "missing", "Music whose file is missing."),
        row("103", "short", "A track that ends before the reference does."),
        row("104", "corrupt", "Random bytes named .mp3."),
        row("105", good, "   "),  # an empty caption
        row("100", good, "A caption_id seen before."),
    ]
    # An earlier set in the folder, with a row at index 0 as the new one will have: the run must replace it.
    set_dir = out / "evalset"
    stale = dict(index=0, caption_id="stale", track_id="0", caption="An earlier set.", sample_rate=SR)
    write_evalset_part([dict(stale, text_emb=np.ones((3, 32)), audio=np.zeros(SR), codes=np.zeros((9, 87)))], set_dir)
    (set_dir / REJECTS_NAME).write_text("index\n")
    start_local_ray()
    csv_path = _write_csv(out / "song_describer.csv", rows)
    summary = run_make_evalset(_config(tiny_pretrained, csv_path, corpus.audio_dir, set_dir))
    print(summary.table())
    return rows, summary, set_dir


def _valid(rows: list[dict]) -> list[int]:
    """Row numbers of the captions that must be in the set."""
    bad = {"102", "103", "104", "105"}
    seen, out = set(), []
    for i, r in enumerate(rows):
        if r["caption_id"] not in bad and r["caption_id"] not in seen:
            out.append(i)
        seen.add(r["caption_id"])
    return out


def test_one_row_per_valid_caption_as_in_the_csv(made):
    rows, summary, set_dir = made
    s = read_evalset(set_dir)
    valid = _valid(rows)
    assert list(s.index) == valid and summary.kept == len(s) == len(valid)
    assert s.captions == [rows[i]["caption"] for i in valid]
    assert s.caption_ids == [rows[i]["caption_id"] for i in valid]
    assert s.track_ids == [rows[i]["track_id"] for i in valid]
    assert s.sample_rate == SR and s.audio.shape == (len(valid), int(SECONDS * SR))


def test_references_are_the_files_audio_at_the_offset(made, corpus):
    rows, _, set_dir = made
    s = read_evalset(set_dir)
    for i, index in enumerate(s.index):
        x, sr = load_audio(corpus.audio_dir / rows[index]["path"])
        x = resample(x, sr, SR)[int(OFFSET * SR) : int((OFFSET + SECONDS) * SR)]
        err = np.abs(s.audio[i] - x).max()
        print(f"{rows[index]['caption_id']}: max |reference - file audio| = {err:.2e}")
        assert err <= 0.5 / PCM_SCALE + 1e-6  # 16-bit PCM: within half a step
        assert np.abs(x).max() > 0.01  # music, not silence
    by_path = {}
    for i, index in enumerate(s.index):  # captions of one track share its reference and codes
        j = by_path.setdefault(rows[index]["path"], i)
        np.testing.assert_array_equal(s.audio[i], s.audio[j])
        np.testing.assert_array_equal(s.codes[i], s.codes[j])
    assert len(by_path) < len(s)


def test_codes_are_the_codecs_codes_of_the_stored_reference(made, tiny_pretrained):
    _, _, set_dir = made
    s = read_evalset(set_dir)
    codec = load_codec(tiny_pretrained["codec"])
    for i in range(len(s)):
        assert s.codes[i].shape == (9, int(np.ceil(SECONDS * SR / 512)))
        np.testing.assert_array_equal(s.codes[i], encode_codes(codec, s.audio[i]))


def test_text_embeddings_are_the_text_encoders(made, tiny_pretrained):
    _, _, set_dir = made
    s = read_evalset(set_dir)
    encoder = TextEncoder(tiny_pretrained["text_encoder"])
    for i, caption in enumerate(s.captions):
        emb, lengths = encoder([caption])  # alone; the pipeline batched it with others
        assert s.text_emb[i].shape == (lengths[0], encoder.dim)
        err = np.abs(s.text_emb[i].astype(np.float32) - emb[0, : lengths[0]].astype(np.float32)).max()
        print(f"{caption!r}: max |stored - alone| = {err:.2e}")
        assert err <= 2e-3 * max(1.0, np.abs(emb).max()), err


def test_bad_rows_are_reported_and_the_rest_written(made):
    rows, summary, set_dir = made
    assert summary.rejected == {"csv": 2, "decode": 2, "clip": 1}
    assert summary.csv_rows == len(rows) and summary.written
    reasons = {r["caption_id"]: (r["stage"], r["reason"]) for r in summary.rejects}
    assert reasons["102"][0] == "decode" and "not found" in reasons["102"][1]
    assert reasons["103"][0] == "clip" and "shorter than eval.reference_offset + eval.seconds" in reasons["103"][1]
    assert reasons["104"][0] == "decode" and "cannot decode" in reasons["104"][1]
    assert reasons["105"] == ("csv", "empty caption")
    assert reasons["100"][0] == "csv" and "duplicate caption_id 100" in reasons["100"][1]
    assert [r["index"] for r in summary.rejects] == sorted(set(range(len(rows))) - set(_valid(rows)))

    with (set_dir / REJECTS_NAME).open(encoding="utf-8", newline="") as f:
        on_disk = list(csv.DictReader(f))
    assert [(int(r["index"]), r["caption_id"], r["stage"], r["reason"]) for r in on_disk] == [
        (r["index"], r["caption_id"], r["stage"], r["reason"]) for r in summary.rejects
    ]
    table = summary.table()
    assert all(f"caption_id {cid} " in table for cid in ("100", "102", "103", "104", "105")), table


def test_a_rerun_replaces_the_earlier_set(made):
    _, summary, set_dir = made
    s = read_evalset(set_dir)
    assert "stale" not in s.caption_ids and len(set(s.index)) == len(s) == summary.kept
    assert sorted(p.name for p in set_dir.parent.iterdir()) == ["evalset", "song_describer.csv"]  # no temporary
    assert len((set_dir / REJECTS_NAME).read_text().splitlines()) == 1 + len(summary.rejects)


def test_a_csv_without_path_fails_before_ray_naming_the_columns(tmp_path, tiny_pretrained):
    from ray_jobs.make_evalset import main

    bad = _write_csv(tmp_path / "no_path.csv", [dict(caption_id="1", track_id="2", caption="x")], SDD_HEADER[:3])
    with pytest.raises(ConfigError, match=r"has no path column \(it has: caption_id, track_id, caption\)"):
        read_evalset_csv(bad)
    cfg = _config(tiny_pretrained, bad, tmp_path, tmp_path / "evalset")
    with pytest.raises(ConfigError, match="caption_id, track_id, caption, path"):
        run_make_evalset(cfg, address="ray://nowhere:1")  # never reached: the CSV is read first
    overrides = [f"{k}={getattr(cfg.eval, k.split('.')[1])}" for k in ("eval.set_csv", "eval.set_dir")]
    assert main(["--config", "debug", *overrides]) == 2
    assert not (tmp_path / "evalset").exists()


def test_csv_rows_and_decode_without_ray(tmp_path, corpus):
    text = '\ufeffcaption_id, track_id ,caption,path\n1,7,"a, b",x.mp3\n1,7,again,x.mp3\n2,,c,x.mp3\n3,7,d\n'
    (tmp_path / "c.csv").write_text(text, encoding="utf-8")
    table = read_evalset_csv(tmp_path / "c.csv")
    assert [(r.index, r.line, r.caption) for r in table.rows] == [(0, 2, "a, b")]
    assert [(r["index"], r["reason"]) for r in table.rejects] == [
        (1, "duplicate caption_id 1 (first on line 2)"),
        (2, "empty track_id"),
        (3, "empty path"),
    ]
    assert table.n_rows == 4

    (short,) = corpus.ids("short")
    row = decode_reference(dict(file=str(corpus.audio_path(short))), sample_rate=SR, offset=0.0, seconds=SECONDS)
    assert row["status"] == "ok" and row["pcm"].dtype == np.int16 and len(row["pcm"]) == SECONDS * SR
    np.testing.assert_array_equal(row["audio"], row["pcm"] / np.float32(PCM_SCALE))
    row = decode_reference(dict(file=str(corpus.audio_path(short))), sample_rate=SR, offset=11.0, seconds=SECONDS)
    assert (row["status"], row["stage"]) == ("rejected", "clip") and row["pcm"].size == 0


def test_a_folder_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        check_set_dir(tmp_path)
    check_set_dir(tmp_path / "new")  # absent: fine
