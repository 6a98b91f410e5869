"""The eval set on disk: one Parquet row per caption, with everything evaluation needs and nothing to recompute.

`simba-ttm make-evalset` writes it from the Song Describer CSV and audio (or any CSV of that layout); evaluation,
Fig. 1 (`codebooks`) and in-training evaluation read it with `read_evalset`. A row holds:

    index       the caption's row number in the CSV (the set's order; `limit` takes the first N)
    caption_id, track_id, caption
    text_emb    (S, D) float16 Flan-T5 features of the caption, as the tokens table stores them; text_len = S
    audio       the reference clip: mono 16-bit PCM at `sample_rate` (44.1 kHz), `eval.seconds` long, starting
                `eval.reference_offset` seconds into the file (what a WAV file of it would hold)
    codes       (9, F) int16 DAC codes of that clip; n_frames = F

Rows of captions of the same track share the reference clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.preprocess.tokens import PART_GLOB, _nested, read_parts, write_part

EVALSET_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),
        ("caption_id", pa.string()),
        ("track_id", pa.string()),
        ("caption", pa.string()),
        ("text_emb", pa.list_(pa.list_(pa.float16()))),
        ("text_len", pa.int32()),
        ("audio", pa.list_(pa.int16())),
        ("sample_rate", pa.int32()),
        ("codes", pa.list_(pa.list_(pa.int16()))),
        ("n_frames", pa.int32()),
    ]
)
PCM_SCALE = 32767.0


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 PCM (clipped, rounded), as a 16-bit WAV file stores it."""
    return np.round(np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0) * PCM_SCALE).astype(np.int16)


def evalset_table(rows: list[dict]) -> pa.Table:
    """Rows with float `audio` (T,), `codes` (9, F) and `text_emb` (S, D) numpy arrays -> an EVALSET_SCHEMA table."""
    columns = {name: [r[name] for r in rows] for name in EVALSET_SCHEMA.names if name not in ("text_len", "n_frames")}
    columns["text_len"] = [int(np.asarray(r["text_emb"]).shape[0]) for r in rows]
    columns["n_frames"] = [int(np.asarray(r["codes"]).shape[-1]) for r in rows]
    columns["codes"] = _nested([np.asarray(c, dtype=np.int16) for c in columns["codes"]], pa.int16())
    columns["text_emb"] = _nested([np.asarray(e, dtype=np.float16) for e in columns["text_emb"]], pa.float16())
    columns["audio"] = pa.array([to_pcm16(a) for a in columns["audio"]], type=pa.list_(pa.int16()))
    return pa.table({name: columns[name] for name in EVALSET_SCHEMA.names}, schema=EVALSET_SCHEMA)


def write_evalset_part(rows: list[dict], directory: str | Path) -> Path | None:
    """Write rows as one new part of the eval set in `directory` (atomic; nothing for no rows)."""
    return write_part(evalset_table(rows), directory) if rows else None


@dataclass
class EvalSet:
    """An eval set in memory, in CSV order."""

    index: np.ndarray  # (N,) int
    caption_ids: list[str]
    track_ids: list[str]
    captions: list[str]
    text_emb: list[np.ndarray]  # N x (S_i, D) float16
    audio: np.ndarray  # (N, T) float32 references in [-1, 1]
    sample_rate: int
    codes: list[np.ndarray]  # N x (9, F) int16

    def __len__(self) -> int:
        return len(self.captions)

    def text_batch(self, rows: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Captions `rows` right-padded as the training reader lays them out: (B, S, D) float16 and (B,) lengths."""
        embs = [self.text_emb[i] for i in rows]
        lengths = np.array([e.shape[0] for e in embs], dtype=np.int64)
        out = np.zeros((len(embs), int(lengths.max(initial=1)), self.text_emb[0].shape[1]), dtype=np.float16)
        for b, e in enumerate(embs):
            out[b, : e.shape[0]] = e
        return out, lengths


def read_evalset(directory: str | Path, limit: int | None = None) -> EvalSet:
    """Read the eval set written by `simba-ttm make-evalset` in `directory`; `limit`: its first N captions.

    Raises:
        FileNotFoundError when `directory` holds no part (naming the command that writes one).
        ValueError when its references differ in length or sample rate.
    """
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.glob(PART_GLOB)):
        raise FileNotFoundError(
            f"no eval set in {str(directory)!r}: write one with `simba-ttm make-evalset --config FILE` "
            "(from eval.set_csv and eval.set_audio_root), or point eval.set_dir at one"
        )
    table = read_parts(directory, schema=EVALSET_SCHEMA).sort_by("index")
    if limit is not None:
        table = table.slice(0, limit)
    rates = set(table.column("sample_rate").to_pylist())
    lengths = set(pc.list_value_length(table.column("audio")).to_pylist())
    if len(rates) != 1 or len(lengths) != 1:
        raise ValueError(
            f"eval set {directory}: references must share one sample rate and length, got {rates}, {lengths}"
        )
    n, length = table.num_rows, lengths.pop()
    audio = table.column("audio").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    audio = audio.reshape(n, length).astype(np.float32) / np.float32(PCM_SCALE)
    return EvalSet(
        index=np.asarray(table.column("index").to_pylist(), dtype=np.int64),
        caption_ids=table.column("caption_id").to_pylist(),
        track_ids=table.column("track_id").to_pylist(),
        captions=table.column("caption").to_pylist(),
        text_emb=[_matrix(v, np.float16) for v in table.column("text_emb").to_pylist()],
        audio=audio,
        sample_rate=int(rates.pop()),
        codes=[_matrix(v, np.int16) for v in table.column("codes").to_pylist()],
    )


def _matrix(rows: list[list], dtype) -> np.ndarray:
    return np.asarray(rows, dtype=dtype)
