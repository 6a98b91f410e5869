"""The on-disk format of preprocessing: token and reject tables as Parquet parts, written atomically.

tokens/part-*.parquet, one row per kept clip:
    track_id     string        Jamendo id, e.g. track_0000214
    artist_id    string
    clip_start   float64       seconds into the track
    caption      string
    codes        list<list<int16>>   (n_codebooks=9, n_frames) DAC codes, all codebooks
    n_frames     int32
    text_emb     list<list<float16>> (text_len, text_dim) Flan-T5 encoder output
    text_len     int32
    split        string        "train" or "val", decided at write time by `SplitRule` (data.split: from the
                               track id, its artist id or a split file, with data.seed, data.val_fraction)

rejects/part-*.parquet, one row per dropped track or clip:
    track_id string, stage string, reason string,
    clip_start float64 (null when the whole track is out: a track-level verdict)

A part is written to a hidden temporary name and renamed into place, so a crash never leaves a file
that a reader (which only reads `part-*.parquet`) would accept.

Exactly once: a part's name is a hash of the track ids of the batch it holds (`part_name`), so a Ray task
retried after it wrote replaces its own part instead of adding a copy. A rerun that batches differently after a
partial write (a crash between a batch's rejects part and its tokens part) can still leave a second row for the
same key in another part, so every reader keeps one row per key (`TOKENS_KEY`; `REJECTS_KEY`, where a
track-level verdict's clip_start is null) and counts the rest (`unique_rows`).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.files import atomic_write

TOKENS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("artist_id", pa.string()),
        ("clip_start", pa.float64()),
        ("caption", pa.string()),
        ("codes", pa.list_(pa.list_(pa.int16()))),
        ("n_frames", pa.int32()),
        ("text_emb", pa.list_(pa.list_(pa.float16()))),
        ("text_len", pa.int32()),
        ("split", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("clip_start", pa.float64()),
    ]
)

PART_GLOB = "part-*.parquet"

# What makes a row unique: one token row per track; one reject row per (track, clip, stage), clip_start null
# for the track-level verdict.
TOKENS_KEY = ("track_id",)
REJECTS_KEY = ("track_id", "clip_start", "stage")


def _unit(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for (seed, key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(track_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for a stable pseudo-random val_fraction of track ids, else 'train'."""
    return "val" if _unit(seed, track_id) < val_fraction else "train"


@dataclass(frozen=True)
class SplitRule:
    """Which split a kept track goes to (data.split):

    hash    a stable pseudo-random data.val_fraction of track ids (`split_of`);
    artist  a stable pseudo-random data.val_fraction of artist ids: every track of an artist is on the same side,
            so validation never shares an artist with training;
    file    the tracks listed in data.split_file (`val_ids`, e.g. MTG-Jamendo's autotagging-validation.tsv);
            every other track is train.
    """

    kind: Literal["hash", "file", "artist"] = "hash"
    val_fraction: float = 0.0
    seed: int = 0
    val_ids: frozenset[str] = frozenset()

    def __call__(self, track_id: str, artist_id: str) -> str:
        if self.kind == "file":
            return "val" if track_id in self.val_ids else "train"
        key = artist_id if self.kind == "artist" else track_id
        return "val" if _unit(self.seed, key) < self.val_fraction else "train"


def part_name(track_ids) -> str:
    """The part name of a batch: a hash of its sorted track ids, so that rewriting the same batch replaces it."""
    digest = hashlib.sha256("\n".join(sorted(str(t) for t in track_ids)).encode()).hexdigest()
    return f"part-{digest[:16]}.parquet"


def first_of_each(table: pa.Table, key: tuple[str, ...], seen: set | None = None) -> np.ndarray:
    """Boolean mask of the rows whose `key` has not appeared before (in `seen`, which is updated, or earlier in
    `table`). Keeping these keeps the first row of each key in part-name order, then row order: deterministic."""
    columns = [table.column(k).to_pylist() for k in key]
    seen = set() if seen is None else seen
    mask = np.zeros(table.num_rows, dtype=bool)
    for i, k in enumerate(zip(*columns, strict=True)):
        if k not in seen:
            seen.add(k)
            mask[i] = True
    return mask


def unique_rows(table: pa.Table, key: tuple[str, ...]) -> tuple[pa.Table, int]:
    """`table` with one row per `key` (the first) and the number of duplicate rows left out."""
    mask = first_of_each(table, key)
    n = int(table.num_rows - mask.sum())
    return (table.filter(pa.array(mask)) if n else table), n


def _nested(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """[(R_i, C) arrays] -> list<list<value_type>> without a Python loop over elements."""
    row_offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    row_offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
    inner_lengths = np.concatenate([np.full(a.shape[0], a.shape[1], dtype=np.int32) for a in arrays] or [[]])
    inner_offsets = np.zeros(len(inner_lengths) + 1, dtype=np.int32)
    inner_offsets[1:] = np.cumsum(inner_lengths)
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat.astype(value_type.to_pandas_dtype()), type=value_type)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), values)
    return pa.ListArray.from_arrays(pa.array(row_offsets), inner)


def tokens_table(rows: list[dict]) -> pa.Table:
    """Rows with numpy `codes` (9, F) int16 and `text_emb` (S, D) float16 -> a table of TOKENS_SCHEMA."""
    columns = {name: [r[name] for r in rows] for name in TOKENS_SCHEMA.names}
    columns["codes"] = _nested([np.asarray(c, dtype=np.int16) for c in columns["codes"]], pa.int16())
    columns["text_emb"] = _nested([np.asarray(e, dtype=np.float16) for e in columns["text_emb"]], pa.float16())
    return pa.table(columns, schema=TOKENS_SCHEMA)


def rejects_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in REJECTS_SCHEMA.names} for r in rows], schema=REJECTS_SCHEMA)


def write_part(table: pa.Table, directory: str | Path, name: str | None = None) -> Path | None:
    """Write `table` as a part in `directory` (temp file + atomic rename). Empty tables write nothing.

    `name`: the part's file name (`part-*.parquet`), so that a retried writer replaces its own part instead of
    adding a second copy; default a new random one.
    """
    if table.num_rows == 0:
        return None
    name = name or f"part-{uuid.uuid4().hex}.parquet"
    return atomic_write(Path(directory) / name, lambda tmp: pq.write_table(table, tmp))


def read_parts(directory: str | Path, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """All complete parts of a table (an empty table of `schema` when there are none)."""
    files = sorted(Path(directory).glob(PART_GLOB)) if Path(directory).is_dir() else []
    if not files:
        empty = schema if schema is not None else pa.schema([])
        if columns is not None and schema is not None:
            empty = pa.schema([schema.field(c) for c in columns])
        return empty.empty_table()
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def read_unique(
    directory: str | Path, key: tuple[str, ...], schema: pa.Schema, columns: list[str] | None = None
) -> tuple[pa.Table, int]:
    """All complete parts of a table with one row per `key` (see `first_of_each`), and the number of duplicate
    rows left out (rows a retried or rerun writer wrote twice)."""
    wanted = columns if columns is not None else schema.names
    read = list(dict.fromkeys([*wanted, *key]))
    table, duplicates = unique_rows(read_parts(directory, read, schema), key)
    return table.select(wanted), duplicates


def read_tokens(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The token table, one row per track."""
    return read_unique(directory, TOKENS_KEY, TOKENS_SCHEMA, columns)[0]


def read_rejects(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The rejects table, one row per track-level verdict and per rejected clip and stage."""
    return read_unique(directory, REJECTS_KEY, REJECTS_SCHEMA, columns)[0]


def finished_track_ids(tokens_dir: str | Path, rejects_dir: str | Path) -> set[str]:
    """Tracks with a final outcome: a written token row, or a track-level rejection (a set: duplicates count once)."""
    done = set(read_parts(tokens_dir, ["track_id"], TOKENS_SCHEMA).column("track_id").to_pylist())
    rejects = read_parts(rejects_dir, ["track_id", "clip_start"], REJECTS_SCHEMA)
    for track_id, clip_start in zip(
        rejects.column("track_id").to_pylist(), rejects.column("clip_start").to_pylist(), strict=True
    ):
        if clip_start is None:
            done.add(track_id)
    return done
