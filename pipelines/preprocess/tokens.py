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
    split        string        "train" or "val" (deterministic in track_id, data.seed, data.val_fraction)

rejects/part-*.parquet, one row per dropped track or clip:
    track_id string, stage string, reason string,
    clip_start float64 (null when the whole track is out: a track-level verdict)

A part is written to a hidden temporary name and renamed into place, so a crash never leaves a file
that a reader (which only reads `part-*.parquet`) would accept.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def split_of(track_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for a stable pseudo-random val_fraction of track ids, else 'train'."""
    digest = hashlib.sha256(f"{seed}:{track_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return directory / name


def read_parts(directory: str | Path, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """All complete parts of a table (an empty table of `schema` when there are none)."""
    files = sorted(Path(directory).glob(PART_GLOB)) if Path(directory).is_dir() else []
    if not files:
        empty = schema if schema is not None else pa.schema([])
        if columns is not None and schema is not None:
            empty = pa.schema([schema.field(c) for c in columns])
        return empty.empty_table()
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def finished_track_ids(tokens_dir: str | Path, rejects_dir: str | Path) -> set[str]:
    """Tracks with a final outcome: a written token row, or a track-level rejection."""
    done = set(read_parts(tokens_dir, ["track_id"], TOKENS_SCHEMA).column("track_id").to_pylist())
    rejects = read_parts(rejects_dir, ["track_id", "clip_start"], REJECTS_SCHEMA)
    for track_id, clip_start in zip(
        rejects.column("track_id").to_pylist(), rejects.column("clip_start").to_pylist(), strict=True
    ):
        if clip_start is None:
            done.add(track_id)
    return done
