"""Exactly-once output: a retried write replaces its own parts (also when Ray retries the task after a worker died
mid-task); duplicate rows from a rewrite under other batching are read once (tokens for training, totals, finished
tracks) and counted in the summary. Real Parquet, and real Ray Data for the retry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.preprocess.graph import PreprocessSummary, on_disk_totals
from pipelines.preprocess.steps import OK, REJECTED, batch_of, write_step
from pipelines.preprocess.tokens import (
    PART_GLOB,
    REJECTS_KEY,
    SplitRule,
    finished_track_ids,
    part_name,
    read_parts,
    read_rejects,
    read_tokens,
    unique_rows,
)
from pipelines.train.dataset import TokenSplit, count_split, describe_splits

SPLIT = SplitRule("hash", val_fraction=0.5, seed=0)


def _row(track_id: str, status: str = OK, clip_rejects: list[dict] = (), stage: str = "", seed: int = 0) -> dict:
    """One row as write_step receives it (the output of CaptionEmbedder)."""
    rng = np.random.default_rng(seed)
    kept = status == OK
    return dict(
        track_id=track_id, artist_id=f"artist_{seed % 2}", status=status, stage=stage,
        reason="" if kept else f"{stage} failed", clip_rejects=json.dumps(list(clip_rejects)),
        clip_start=30.0 if kept else -1.0, caption="a calm piano piece" if kept else "",
        codes=rng.integers(0, 1024, (9, 6)).astype(np.int16) if kept else np.zeros((0, 0), np.int16),
        text_emb=rng.standard_normal((3, 4)).astype(np.float16) if kept else np.zeros((0, 0), np.float16),
        text_len=3 if kept else 0,
    )  # fmt: skip


def _silent_clip(track_id: str, start: float = 0.0) -> dict:
    return dict(track_id=track_id, stage="silence", reason=f"clip at {start:g} s is silent", clip_start=start)


def _rows() -> list[dict]:
    return [
        _row("track_0000001", seed=1),
        _row("track_0000002", clip_rejects=[_silent_clip("track_0000002")], seed=2),
        _row("track_0000003", REJECTED, [_silent_clip("track_0000003", 0.0)], stage="silence", seed=3),
        _row("track_0000004", seed=4),
    ]


def _write(rows: list[dict], out: Path) -> dict:
    return write_step(batch_of(rows), tokens_dir=str(out / "tokens"), rejects_dir=str(out / "rejects"), split=SPLIT)


def _raw_keys(table, key) -> list[tuple]:
    return list(zip(*(table.column(k).to_pylist() for k in key), strict=True))


def test_a_retried_write_replaces_its_own_parts(tmp_path):
    """Ray retries a write task on the same block: the second write of a batch must not add rows."""
    rows = _rows()
    _write(rows, tmp_path)
    first = {d: sorted(p.name for p in (tmp_path / d).glob(PART_GLOB)) for d in ("tokens", "rejects")}
    _write(rows, tmp_path)
    for d in ("tokens", "rejects"):
        assert sorted(p.name for p in (tmp_path / d).glob(PART_GLOB)) == first[d] and len(first[d]) == 1
        assert not list((tmp_path / d).glob(".*")), "no temporary file is left behind"
    tokens = read_parts(tmp_path / "tokens")  # the raw parts, without any deduplication
    rejects = read_parts(tmp_path / "rejects")
    assert sorted(tokens.column("track_id").to_pylist()) == ["track_0000001", "track_0000002", "track_0000004"]
    keys = _raw_keys(rejects, REJECTS_KEY)
    assert len(keys) == len(set(keys)) == 3  # two clip-level rejects and one track-level verdict
    assert first["tokens"] == [part_name(r["track_id"] for r in reversed(rows))]  # the name ignores the order


def test_a_write_task_that_ray_retries_after_writing_adds_no_rows(tmp_path, ray_session):
    """The worker dies right after write_step wrote its parts (once: a marker file says so); Ray Data runs the
    task again on the same block, which must replace those parts, not add a copy."""
    import os

    ray = ray_session
    marker = tmp_path / "died-once"
    out = {"tokens_dir": str(tmp_path / "tokens"), "rejects_dir": str(tmp_path / "rejects")}

    def write_then_die_once(batch, *, marker: str, **kwargs):
        status = write_step(batch, **kwargs)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies after the write: a system failure, which Ray retries
        return status

    ds = ray.data.from_items(_rows(), override_num_blocks=1)
    ds = ds.map_batches(write_then_die_once, batch_size=4, fn_kwargs=dict(marker=str(marker), split=SPLIT, **out))
    statuses = ds.take_all()
    assert marker.exists() and len(statuses) == 4
    for d in ("tokens", "rejects"):
        assert len(list((tmp_path / d).glob(PART_GLOB))) == 1
    assert sorted(read_parts(tmp_path / "tokens").column("track_id").to_pylist()) == [
        "track_0000001",
        "track_0000002",
        "track_0000004",
    ]
    keys = _raw_keys(read_parts(tmp_path / "rejects"), REJECTS_KEY)
    assert len(keys) == len(set(keys)) == 3


def test_rows_written_twice_under_other_batching_are_read_once_and_counted(tmp_path):
    """A crash between a batch's rejects part and its tokens part, then a rerun that batches the same tracks
    differently, leaves rows of one track in two parts: every reader sees one row per key, the summary says how
    many it left out."""
    rows = _rows()
    _write(rows[:3], tmp_path)  # the first run's batch ...
    _write(rows[1:], tmp_path)  # ... and a rerun's, overlapping in tracks 2 and 3 (as if a tokens part was lost)
    assert len(list((tmp_path / "tokens").glob(PART_GLOB))) == 2
    raw_tokens, raw_rejects = read_parts(tmp_path / "tokens"), read_parts(tmp_path / "rejects")
    assert raw_tokens.num_rows == 4 and raw_rejects.num_rows == 6  # 1 token row and 3 reject rows written twice

    tokens, rejects = read_tokens(tmp_path / "tokens"), read_rejects(tmp_path / "rejects")
    assert sorted(tokens.column("track_id").to_pylist()) == ["track_0000001", "track_0000002", "track_0000004"]
    assert len(set(_raw_keys(rejects, REJECTS_KEY))) == rejects.num_rows == 3
    assert finished_track_ids(tmp_path / "tokens", tmp_path / "rejects") == {f"track_000000{i}" for i in (1, 2, 3, 4)}

    totals = on_disk_totals(str(tmp_path / "tokens"), str(tmp_path / "rejects"))
    assert totals["token rows"] == 3 and totals["train"] + totals["val"] == 3
    assert totals["rejected tracks"] == 1 and totals["rejected clips"] == 2
    assert totals["duplicates ignored"] == 4
    assert "  duplicates ignored    4" in PreprocessSummary(totals=totals).table()

    # training reads each track once, whichever split it is in
    read = dict(codebook=0, max_frames=8, pad_id=1024)
    splits = [TokenSplit.read(tmp_path / "tokens", s, **read) for s in ("train", "val")]
    ids = [t for s in splits for t in s.track_ids]
    assert sorted(ids) == sorted(tokens.column("track_id").to_pylist())
    assert sum(s.duplicates for s in splits) == 2  # each split's reader passes over the one duplicate row
    assert describe_splits("T", *splits).endswith(
        ", 1 val rows; 1 duplicate row(s) left out (token parts written twice for the same tracks)"
    )
    assert count_split(tmp_path / "tokens", "train") + count_split(tmp_path / "tokens", "val") == 3


def test_the_first_row_of_a_key_is_kept():
    import pyarrow as pa

    table = pa.table({"track_id": ["a", "b", "a", "c", "b"], "clip_start": [None, 0.0, None, None, 30.0],
                      "stage": ["decode", "silence", "decode", "clip", "silence"], "n": [0, 1, 2, 3, 4]})  # fmt: skip
    unique, n = unique_rows(table, REJECTS_KEY)
    assert n == 1 and unique.column("n").to_pylist() == [0, 1, 3, 4]
    unique, n = unique_rows(table, ("track_id",))
    assert n == 2 and unique.column("n").to_pylist() == [0, 1, 3]
