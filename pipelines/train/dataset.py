"""Training data: the token Parquet -> one split in memory -> seeded, rank-disjoint, resumable micro-batches.

A training sequence is [BOS, c_1 .. c_F] of one DAC codebook (codebook 0 by default), cut to the first
`max_frames` frames (2588 in the paper, ~30.05 s) and right-padded with the pad id; inputs are the sequence
without its last token and targets the sequence without BOS, so padded positions are ignored by the loss.
Text is the cached Flan-T5 output, right-padded to the longest caption of the batch.

Why not a streaming Ray Dataset per worker: an exact resume and a run that repeats itself under the same seed
need the data order to be a function of (seed, epoch, rank, world size) alone, and a streaming split's order
depends on which read task finishes first; every epoch also restarts a streaming execution (seconds each).
A split is small next to the model's working set: codebook 0 of 54k paper clips is 280 MB as int16, and the
unpadded caption embeddings ~2-3 GB as fp16. So each worker reads its split once (`TokenSplit.read`) and
`EpochBatches` addresses it by row: epoch e visits the rows in the permutation seeded by (seed, e), rank r of
w takes every w-th row of it (disjoint shards, equal length, so DDP's collectives stay in step), and a resumed
run starts at the micro-batch it had reached.

A track has one row: should a retried or rerun preprocessing writer have left a second row of a track in another
part, the first in file order is read and the others are counted (`TokenSplit.duplicates`), never trained on twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.preprocess.tokens import PART_GLOB, TOKENS_KEY, first_of_each

COLUMNS = ["track_id", "codes", "text_emb", "split"]
READ_BATCH_ROWS = 256  # rows per Arrow batch while reading: bounds the transient memory of the nested codes


def token_files(tokens_dir: str | Path) -> list[str]:
    """The complete Parquet parts of a token table (absolute paths); an error naming the folder if none."""
    files = sorted(str(p.resolve()) for p in Path(tokens_dir).glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"no token parts ({PART_GLOB}) in {Path(tokens_dir).resolve()}: run preprocess first")
    return files


def count_split(tokens_dir: str | Path, split: str) -> int:
    """Rows of a split, one per track, read from two string columns (cheap)."""
    seen: set = set()
    n = 0
    for f in token_files(tokens_dir):
        table = pq.read_table(f, columns=[*TOKENS_KEY, "split"])
        table = table.filter(first_of_each(table, TOKENS_KEY, seen))
        n += pc.sum(pc.equal(table.column("split"), split)).as_py() or 0
    return n


@dataclass
class TokenSplit:
    """One split of the token table in memory, addressable by row.

    tokens: (N, max_frames + 1) int16, BOS then the frames then padding; text: all caption embeddings
    stacked (sum of S_i, D) float16, row i being text[text_offsets[i] : text_offsets[i + 1]].
    Rows are in file order, then row order within a file: the same on every worker and every run.
    """

    track_ids: np.ndarray  # (N,) str
    tokens: np.ndarray
    text: np.ndarray
    text_offsets: np.ndarray  # (N + 1,) int64
    duplicates: int = 0  # rows of a track already read (from another part), left out

    def __len__(self) -> int:
        return len(self.track_ids)

    @classmethod
    def read(cls, tokens_dir: str | Path, split: str, *, codebook: int, max_frames: int, pad_id: int) -> TokenSplit:
        """Rows of `split` ("train" or "val") of the token parts in `tokens_dir`."""
        ids: list[str] = []
        tokens: list[np.ndarray] = []
        texts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        seen: set = set()  # track ids read so far, of every split
        duplicates = 0
        for file in token_files(tokens_dir):
            for batch in pq.ParquetFile(file).iter_batches(batch_size=READ_BATCH_ROWS, columns=COLUMNS):
                first = first_of_each(batch, TOKENS_KEY, seen)
                duplicates += int(len(first) - first.sum())
                batch = batch.filter(pa.array(first))
                batch = batch.filter(pc.equal(batch.column("split"), split))
                if batch.num_rows == 0:
                    continue
                ids += batch.column("track_id").to_pylist()
                tokens.append(_sequences(batch.column("codes"), codebook, max_frames, pad_id))
                text, length = _captions(batch.column("text_emb"))
                texts.append(text)
                lengths.append(length)
        if not ids:
            empty = np.zeros((0, max_frames + 1), np.int16)
            text = np.zeros((0, 0), np.float16)
            return cls(np.array([], dtype=object), empty, text, np.zeros(1, np.int64), duplicates)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(np.array(ids, dtype=object), np.concatenate(tokens), np.concatenate(texts), offsets, duplicates)

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Numpy micro-batch of `rows`: tokens (B, T+1) int64, text (ragged (S_i, D) float16), index, track_id."""
        text = np.empty(len(rows), dtype=object)
        text[:] = [self.text[self.text_offsets[i] : self.text_offsets[i + 1]] for i in rows]
        return {
            "tokens": self.tokens[rows].astype(np.int64),
            "text": text,
            "index": np.asarray(rows, dtype=np.int64),
            "track_id": self.track_ids[rows],
        }


def _sequences(codes, codebook: int, max_frames: int, pad_id: int) -> np.ndarray:
    """list<list<int16>> codes (rows of n_codebooks x F) -> (B, max_frames + 1) int16 [BOS, frames, pad...]."""
    one = pc.list_element(codes, codebook)  # list<int16> per row
    offsets = one.offsets.to_numpy()
    values = one.values.to_numpy(zero_copy_only=False)
    out = np.full((len(one), max_frames + 1), pad_id, dtype=np.int16)  # BOS shares the pad id
    for i in range(len(one)):
        frames = values[offsets[i] : min(offsets[i + 1], offsets[i] + max_frames)]
        out[i, 1 : 1 + len(frames)] = frames
    return out


def _captions(text_emb) -> tuple[np.ndarray, np.ndarray]:
    """list<list<float16>> (rows of S_i x D) -> stacked (sum S_i, D) float16 and the S_i."""
    lengths = pc.list_value_length(text_emb).to_numpy(zero_copy_only=False).astype(np.int64)
    vectors = pc.list_flatten(text_emb)  # one list<float16> per caption token
    flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
    dim = len(flat) // max(len(vectors), 1)
    return flat.astype(np.float16, copy=False).reshape(len(vectors), dim), lengths


def collate(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Pad text to the batch's longest caption; split the sequences into inputs and targets."""
    tokens = torch.from_numpy(np.asarray(batch["tokens"], dtype=np.int64))
    texts = [np.asarray(t) for t in batch["text"]]
    S = max(t.shape[0] for t in texts)
    D = max(t.shape[1] for t in texts)
    text = torch.zeros(len(texts), S, D, dtype=torch.float32)
    mask = torch.zeros(len(texts), S, dtype=torch.bool)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]] = torch.from_numpy(t.astype(np.float32))
        mask[i, : t.shape[0]] = True
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "text": text, "text_mask": mask}
    return {k: v.to(device) for k, v in out.items()}


def rank_rows(
    n: int, *, epoch: int, seed: int, rank: int, world: int, batch_size: int, shuffle: bool = True,
    drop_last: bool = True,
) -> np.ndarray:  # fmt: skip
    """The rows rank `rank` of `world` visits in `epoch`, in order.

    shuffle: the epoch's order is the permutation seeded by (seed, epoch); else row order.
    drop_last: every rank gets the same whole number of micro-batches (the tail of the order is left out this
    epoch; a fresh permutation next epoch leaves out other rows), else rank r gets every row r, r + w, ...
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = order[rank::world]
    if drop_last:
        per_rank = (n // world) // batch_size * batch_size
        mine = mine[:per_rank]
    return mine


def describe_splits(tokens_dir: str | Path, train: TokenSplit, val: TokenSplit | None) -> str:
    """One line for the training log: rows per split, and the duplicate rows the readers left out (if any)."""
    line = f"tokens {tokens_dir}: {len(train)} train rows, " + (
        f"{len(val)} val rows" if val is not None else "val not read"
    )
    if train.duplicates:  # every split's reader passes over all parts, so each counts every duplicate
        line += f"; {train.duplicates} duplicate row(s) left out (token parts written twice for the same tracks)"
    return line


class EpochBatches:
    """Micro-batches of one worker's share of a split, epoch by epoch (see the module docstring)."""

    def __init__(
        self, split: TokenSplit, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
        shuffle: bool = True, drop_last: bool = True,
    ):  # fmt: skip
        self.split = split
        self.batch_size = batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last

    def rows(self, epoch: int) -> np.ndarray:
        return rank_rows(len(self.split), epoch=epoch, seed=self.seed, rank=self.rank, world=self.world,
                         batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last)  # fmt: skip

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Numpy micro-batches of `epoch` from micro-batch `start` on (a resumed run skips what it consumed)."""
        rows = self.rows(epoch)
        if self.drop_last and len(rows) == 0:
            raise ValueError(
                f"{len(self.split)} rows cannot fill one micro-batch of {self.batch_size} on each of {self.world} "
                "workers: lower train.batch_size or preprocess more data"
            )
        for i in range(start * self.batch_size, len(rows), self.batch_size):
            yield self.split.batch(rows[i : i + self.batch_size])
