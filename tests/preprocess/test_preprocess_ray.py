"""The preprocessing pipeline end to end on a real Ray runtime, a generated corpus and tiny real models."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from configs.schema import ConfigError, ExperimentConfig
from modeling.pretrained.errors import MissingWeightsError
from pipelines.preprocess.graph import on_disk_totals, run_preprocess
from pipelines.preprocess.tokens import REJECTS_KEY, REJECTS_SCHEMA, TOKENS_SCHEMA, read_parts, read_rejects
from tests.conftest import preprocess_config

# What the pipeline must do with each kind of track make_corpus writes: (table, stage).
EXPECTED = {
    "good": {("tokens", None)},
    "silence": {("tokens", None), ("rejects", "silence")},  # kept when another clip of it is not silent
    "sdd": {("rejects", "exclusion")},
    "vocals": {("rejects", "vocal_filter")},
    "corrupt": {("rejects", "decode")},
    "empty": {("rejects", "decode")},
    "missing": {("rejects", "decode")},
    "nonfinite": {("rejects", "decode")},
    "short": {("rejects", "clip")},
    "malformed": {("rejects", "metadata")},
    "no_caption": {("rejects", "caption")},
}


def _outcomes(cfg) -> dict[str, tuple[str, str | None]]:
    tokens = read_parts(cfg.data.tokens_dir, schema=TOKENS_SCHEMA)
    rejects = read_parts(cfg.preprocess.rejects_dir, schema=REJECTS_SCHEMA)
    out: dict[str, tuple[str, str | None]] = {}
    for track_id in tokens.column("track_id").to_pylist():
        assert track_id not in out, f"{track_id} has two token rows"
        out[track_id] = ("tokens", None)
    for row in rejects.to_pylist():
        if row["clip_start"] is None:
            assert row["track_id"] not in out, f"{row['track_id']} has two outcomes"
            assert row["reason"], row
            out[row["track_id"]] = ("rejects", row["stage"])
    return out


def _keys(rejects) -> list[tuple]:
    return list(zip(*(rejects.column(k).to_pylist() for k in REJECTS_KEY), strict=True))


def _with_data(cfg, **data):
    d = cfg.to_dict()
    return ExperimentConfig.from_dict({**d, "data": {**d["data"], **data}})


@pytest.fixture
def first_run(preprocessed, ray_session):
    return preprocessed


def test_every_track_has_exactly_its_expected_outcome(first_run, corpus):
    cfg, summary = first_run
    outcomes = _outcomes(cfg)
    assert set(outcomes) == {t.track_id for t in corpus.tracks}
    for t in corpus.tracks:
        assert outcomes[t.track_id] in EXPECTED[t.kind], (t.kind, outcomes[t.track_id])
    kept = sum(1 for table, _ in outcomes.values() if table == "tokens")
    assert summary.kept == kept >= 1
    assert summary.totals["token rows"] == kept
    assert summary.totals["duplicates ignored"] == 0
    assert summary.tracks_in_metadata == len(corpus.tracks)
    assert summary.notes == []


def test_reasons_name_the_problem(first_run, corpus):
    cfg, _ = first_run
    rejects = {r["track_id"]: r["reason"] for r in read_parts(cfg.preprocess.rejects_dir).to_pylist()
               if r["clip_start"] is None}  # fmt: skip
    by_kind = {t.kind: rejects.get(t.track_id, "") for t in corpus.tracks}
    assert "non-finite" in by_kind["nonfinite"]
    assert "empty" in by_kind["empty"]
    assert "not found" in by_kind["missing"]
    assert "shorter than one 30 s clip" in by_kind["short"]
    assert "Song Describer" in by_kind["sdd"]
    assert "line" in by_kind["malformed"]
    assert "no caption" in by_kind["no_caption"]


def test_token_parquet_schema_and_contents(first_run):
    cfg, _ = first_run
    from pipelines.preprocess.graph import SETTINGS_FILE

    files = sorted(Path(cfg.data.tokens_dir).glob("*"))
    assert Path(cfg.data.tokens_dir) / SETTINGS_FILE in files  # what the rows were made with; readers skip it
    files = [f for f in files if f.name != SETTINGS_FILE]
    assert files and all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    assert pq.read_table(cfg.data.tokens_dir).num_rows == read_parts(cfg.data.tokens_dir).num_rows
    table = pq.read_table(files[0])
    assert table.schema.equals(TOKENS_SCHEMA)
    for row in read_parts(cfg.data.tokens_dir).to_pylist():
        codes = np.asarray(row["codes"], dtype=np.int16)
        assert codes.shape == (9, row["n_frames"]) and row["n_frames"] == 2584  # 30 s at 44.1 kHz / 512
        assert 0 <= codes.min() and codes.max() < 1024
        emb = np.asarray(row["text_emb"], dtype=np.float16)
        assert emb.shape == (row["text_len"], 32) and np.isfinite(emb).all()
        assert row["split"] in ("train", "val") and row["caption"]
        assert row["clip_start"] % 30.0 == 0.0


def test_kept_clips_carry_their_own_clip_level_caption(first_run, corpus):
    from pipelines.preprocess.captions import FileCaptioner
    from pipelines.preprocess.jamendo import Track

    cfg, _ = first_run
    captions = FileCaptioner(corpus.captions_path)
    for row in read_parts(cfg.data.tokens_dir).to_pylist():
        track = Track(row["track_id"], "", "", "", 0.0, [])
        clip_caption = captions.clip_captions[row["track_id"]]
        assert any(abs(start - row["clip_start"]) < 1e-3 for start, _ in clip_caption)
        assert row["caption"] == captions(track, clip_start=row["clip_start"])


def test_rerun_adds_nothing_and_loses_nothing(first_run):
    cfg, _ = first_run
    before_tokens = read_parts(cfg.data.tokens_dir).sort_by("track_id")
    before_rejects = read_parts(cfg.preprocess.rejects_dir).num_rows
    again = run_preprocess(cfg)
    assert again.processed == 0 and again.kept == 0
    assert again.skipped_done == again.tracks_in_metadata
    assert read_parts(cfg.data.tokens_dir).sort_by("track_id").equals(before_tokens)
    assert read_parts(cfg.preprocess.rejects_dir).num_rows == before_rejects
    assert again.totals["duplicates ignored"] == 0


def test_a_rerun_with_other_split_settings_is_refused(first_run):
    """The split is stored per row and a rerun writes only the unfinished tracks: mixing two rules is refused."""
    cfg, _ = first_run
    other = _with_data(cfg, val_fraction=0.6)
    with pytest.raises(ConfigError, match=r"data\.split, data\.split_file, data\.val_fraction or data\.seed"):
        run_preprocess(other, check_pretrained=False)


def test_a_lost_part_is_redone_with_the_same_clip(first_run):
    """Delete the token parts (as if the run had crashed before writing them): a rerun redoes exactly those
    tracks and, with the same seed, picks the same clips and writes the same codes."""
    cfg, _ = first_run
    before = {r["track_id"]: r for r in read_parts(cfg.data.tokens_dir).to_pylist()}
    before_totals = on_disk_totals(cfg.data.tokens_dir, cfg.preprocess.rejects_dir)
    before_rejects = set(_keys(read_parts(cfg.preprocess.rejects_dir)))
    for part in Path(cfg.data.tokens_dir).glob("part-*.parquet"):
        part.unlink()
    again = run_preprocess(cfg)
    assert again.processed == len(before)
    # The redone tracks' clip rejections were on disk already and are written again (in other batches, under other
    # part names): they count once, and the extra copies are reported.
    counted = {k: v for k, v in again.totals.items() if k != "duplicates ignored"}
    assert counted == {k: v for k, v in before_totals.items() if k != "duplicates ignored"}
    rejects = read_rejects(cfg.preprocess.rejects_dir)
    assert len(_keys(rejects)) == len(set(_keys(rejects))) and set(_keys(rejects)) == before_rejects
    raw = read_parts(cfg.preprocess.rejects_dir).num_rows
    assert again.totals["duplicates ignored"] == raw - rejects.num_rows
    after = {r["track_id"]: r for r in read_parts(cfg.data.tokens_dir).to_pylist()}
    assert set(after) == set(before)
    for track_id, row in before.items():
        assert after[track_id]["clip_start"] == row["clip_start"]
        assert after[track_id]["codes"] == row["codes"]
        assert after[track_id]["caption"] == row["caption"]


def test_token_rows_of_tracks_the_metadata_does_not_list_are_a_note(first_run, tmp_path):
    """Token rows of tracks outside the metadata TSV (an earlier corpus's, another shard's) are read by training:
    said in the summary, not refused (several TSV shards into one token table is legitimate)."""
    cfg, _ = first_run
    out = {name: tmp_path / name for name in ("tokens", "rejects")}
    shutil.copytree(cfg.data.tokens_dir, out["tokens"])
    shutil.copytree(cfg.preprocess.rejects_dir, out["rejects"])
    kept = sorted(set(read_parts(cfg.data.tokens_dir, ["track_id"]).column("track_id").to_pylist()))
    header, *rows = Path(cfg.preprocess.metadata_tsv).read_text().splitlines(keepends=True)
    shard = tmp_path / "shard.tsv"  # the same corpus without the kept tracks' rows
    shard.write_text(header + "".join(r for r in rows if r.split("\t", 1)[0] not in kept))
    d = cfg.to_dict()
    d["preprocess"].update(metadata_tsv=str(shard), rejects_dir=str(out["rejects"]))
    d["data"]["tokens_dir"] = str(out["tokens"])
    summary = run_preprocess(ExperimentConfig.from_dict(d), check_pretrained=False)  # all done: no Ray
    assert summary.processed == 0 and summary.totals["token rows"] == len(kept)
    note = summary.table().splitlines()[-1]
    print(note)
    assert note.startswith(f"NOTE: {len(kept)} token row(s) in {out['tokens']} are of tracks not in preprocess.")
    assert kept[0] in note and "training reads every row of data.tokens_dir" in note


def test_missing_weights_fail_before_reading_data(corpus, tiny_pretrained, tmp_path):
    cfg = preprocess_config(corpus, {**tiny_pretrained, "codec": str(tmp_path / "nope.pth")}, tmp_path)
    with pytest.raises(MissingWeightsError, match="preprocess.codec"):
        run_preprocess(cfg)
    assert not (tmp_path / "rejects").exists() and not (tmp_path / "tokens").exists()


def test_the_job_names_missing_weights_without_starting_ray(corpus, tiny_pretrained, tmp_path):
    """`simba-ttm preprocess` checks the models before Ray starts (it used to start Ray, then fail)."""
    import os
    import subprocess
    import sys

    cfg = preprocess_config(corpus, {**tiny_pretrained, "codec": str(tmp_path / "nope.pth")}, tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.preprocess", "--config", str(cfg.dump_yaml(tmp_path / "cfg.yaml"))],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "preprocess.codec" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_a_malformed_caption_file_stops_before_any_work(corpus, tiny_pretrained, tmp_path):
    bad = tmp_path / "captions.tsv"
    bad.write_text("track_id\tclip_start\tcaption\n214\t0\tone\n214\t0.0\ttwo\n")
    cfg = preprocess_config(corpus, tiny_pretrained, tmp_path, f"preprocess.caption_file={bad}")
    with pytest.raises(ConfigError, match="preprocess.caption_file: .*line 3: second, different caption"):
        run_preprocess(cfg, check_pretrained=False)
    assert not (tmp_path / "rejects").exists() and not (tmp_path / "tokens").exists()


def test_summary_is_json_serialisable(first_run):
    _, summary = first_run
    assert json.loads(json.dumps(asdict(summary)))["tracks_in_metadata"] == summary.tracks_in_metadata


def test_a_rerun_that_would_keep_excluded_tracks_in_training_is_refused(first_run, tmp_path):
    """A first run without the Song Describer list kept tracks that the list names; a rerun skips finished tracks,
    so they would stay in training: refused, naming them."""
    cfg, _ = first_run
    kept = sorted(set(read_parts(cfg.data.tokens_dir, ["track_id"]).column("track_id").to_pylist()))[0]
    listed = tmp_path / "song_describer.csv"
    listed.write_text(f"caption_id,track_id,caption\n1,{kept.removeprefix('track_')},a caption\n")
    d = cfg.to_dict()
    d["preprocess"]["exclude_csv"] = str(listed)
    with pytest.raises(ConfigError, match=f"1 track\\(s\\) of preprocess.exclude_csv have token rows .*{kept}"):
        run_preprocess(ExperimentConfig.from_dict(d), check_pretrained=False)


def test_models_of_another_sample_rate_are_refused_before_any_work(corpus, tiny_pretrained, tmp_path):
    """At 48 kHz every track was rejected at separation (the separator runs at 44.1 kHz), for good."""
    cfg = preprocess_config(corpus, tiny_pretrained, tmp_path, "preprocess.sample_rate=48000")
    with pytest.raises(ConfigError, match="preprocess.sample_rate is 48000 Hz, the separator's is 44100 Hz"):
        run_preprocess(cfg)
    assert not (tmp_path / "rejects").exists() and not (tmp_path / "tokens").exists()


def test_a_rerun_with_other_output_settings_is_refused(first_run):
    """A rerun writes only the unfinished tracks: made with another clip length or silence rule, they would mix with
    the rows on disk. The table records what it was made with, and a rerun must match it."""
    from pipelines.preprocess.graph import SETTINGS_FILE

    cfg, _ = first_run
    recorded = json.loads((Path(cfg.data.tokens_dir) / SETTINGS_FILE).read_text())
    assert recorded["preprocess.clip_seconds"] == cfg.preprocess.clip_seconds
    d = cfg.to_dict()
    d["preprocess"].update(clip_seconds=cfg.preprocess.clip_seconds / 2, silence_threshold_db=-50.0)
    message = r"made with other settings.*\n  preprocess.clip_seconds: .*\n  preprocess.silence_threshold_db: -60.0"
    with pytest.raises(ConfigError, match=message):
        run_preprocess(ExperimentConfig.from_dict(d), check_pretrained=False)


def test_settings_recorded_by_a_run_that_wrote_nothing_are_replaced(first_run, tmp_path):
    """A first run that stopped before its first part (a wrong setting, say) must not lock in its settings."""
    from pipelines.preprocess.graph import SETTINGS_FILE, check_settings

    d = first_run[0].to_dict()
    d["data"]["tokens_dir"], d["preprocess"]["rejects_dir"] = str(tmp_path / "tokens"), str(tmp_path / "rejects")
    check_settings(ExperimentConfig.from_dict(d))  # records clip_seconds 30
    d["preprocess"]["clip_seconds"] = 10.0
    check_settings(ExperimentConfig.from_dict(d))  # nothing written under the first: replaced
    for folder in ("tokens", "rejects"):  # kept in both: deleting the tokens to redo the kept tracks keeps it
        assert json.loads((tmp_path / folder / SETTINGS_FILE).read_text())["preprocess.clip_seconds"] == 10.0


def test_a_project_moved_whole_still_matches_its_settings(first_run, tmp_path, monkeypatch):
    """Model files are recorded with the project root: moving the project (another disk, another checkout) is not a
    change of settings, nor is running from elsewhere with the same absolute paths; another model file still is."""
    import shutil

    from pipelines.paths import ROOT_ENV, absolute_paths
    from pipelines.preprocess.graph import SETTINGS_FILE, check_settings

    cfg = first_run[0]
    old, new = tmp_path / "old", tmp_path / "moved"
    (old / "models").mkdir(parents=True)
    shutil.copytree(cfg.data.tokens_dir, old / "tokens")  # real parts: the record is compared, not replaced
    shutil.copytree(cfg.preprocess.rejects_dir, old / "rejects")
    for name in ("codec.pth", "other_codec.pth"):
        shutil.copy(cfg.preprocess.codec, old / "models" / name)
    for folder in ("tokens", "rejects"):  # the first run's record names its codec: made again for this project
        (old / folder / SETTINGS_FILE).unlink()
    d = cfg.to_dict()
    d["data"]["tokens_dir"], d["preprocess"]["rejects_dir"] = "tokens", "rejects"
    d["preprocess"]["codec"] = "models/codec.pth"
    monkeypatch.setenv(ROOT_ENV, str(old))
    check_settings(absolute_paths(ExperimentConfig.from_dict(d)))
    recorded = json.loads((old / "tokens" / SETTINGS_FILE).read_text())
    assert (recorded["preprocess.codec"], recorded["project_root"]) == (str(old / "models" / "codec.pth"), str(old))

    old.rename(new)
    monkeypatch.setenv(ROOT_ENV, str(new))
    moved = absolute_paths(ExperimentConfig.from_dict(d))
    check_settings(moved)  # the same settings, moved

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))  # another root, the same absolute paths
    check_settings(moved)
    record = new / "tokens" / SETTINGS_FILE  # an earlier version's record (absolute paths, no root): compared as is
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "project_root"}))
    check_settings(moved)

    monkeypatch.setenv(ROOT_ENV, str(new))
    d["preprocess"]["codec"] = "models/other_codec.pth"
    with pytest.raises(ConfigError, match=r"preprocess.codec: '\S+/models/codec.pth' -> '\S+/models/other_codec.pth'"):
        check_settings(absolute_paths(ExperimentConfig.from_dict(d)))
