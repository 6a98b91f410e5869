"""Training data: token Parquet -> Ray Data -> padded torch batches.

A training sequence is [BOS, c_1 .. c_F] of one DAC codebook (codebook 0 by default), cut to the first
`max_frames` frames (2588 in the paper, ~30.05 s) and right-padded with the pad id; inputs are the sequence
without its last token and targets the sequence without BOS, so padded positions are ignored by the loss.
Text is the cached Flan-T5 output, right-padded to the longest caption of the batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from pipelines.preprocess.tokens import PART_GLOB

COLUMNS = ["codes", "n_frames", "text_emb", "text_len", "split"]


def token_files(tokens_dir: str | Path) -> list[str]:
    """The complete Parquet parts of a token table (absolute paths); an error naming the folder if none."""
    files = sorted(str(p.resolve()) for p in Path(tokens_dir).glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"no token parts ({PART_GLOB}) in {Path(tokens_dir).resolve()}: run preprocess first")
    return files


def to_training_rows(
    batch: pa.Table, *, codebook: int, max_frames: int, pad_id: int, split: str
) -> dict[str, np.ndarray]:
    """Arrow batch of token rows -> {"tokens": (B, max_frames + 1) int64, "text": ragged (S_i, D) float16}.

    Rows of other splits are dropped here, so one read serves both the train and the validation dataset.
    """
    batch = batch.filter(pc.equal(batch.column("split"), split))
    n = batch.num_rows
    tokens = np.full((n, max_frames + 1), pad_id, dtype=np.int64)
    tokens[:, 0] = pad_id  # BOS shares the pad id
    codes = pc.list_element(batch.column("codes"), codebook)  # list<int16> per row: one codebook
    for i, row in enumerate(codes.to_numpy(zero_copy_only=False)):
        frames = np.asarray(row[:max_frames], dtype=np.int64)
        tokens[i, 1 : 1 + len(frames)] = frames
    text = np.empty(n, dtype=object)
    for i, emb in enumerate(batch.column("text_emb").to_pylist()):
        text[i] = np.asarray(emb, dtype=np.float16)  # (S_i, D)
    return {"tokens": tokens, "text": text}


def collate(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Pad text to the batch's longest caption; split the sequences into inputs and targets."""
    tokens = torch.from_numpy(np.array(list(batch["tokens"]) if batch["tokens"].dtype == object else batch["tokens"]))
    texts = [np.asarray(t) for t in batch["text"]]
    S = max(t.shape[0] for t in texts)
    D = texts[0].shape[1]
    text = torch.zeros(len(texts), S, D, dtype=torch.float32)
    mask = torch.zeros(len(texts), S, dtype=torch.bool)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]] = torch.from_numpy(t.astype(np.float32))
        mask[i, : t.shape[0]] = True
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "text": text, "text_mask": mask}
    return {k: v.to(device) for k, v in out.items()}


def read_split(tokens_dir: str | Path, split: str, *, codebook: int, max_frames: int, pad_id: int):
    """A Ray Dataset of training rows of one split ("train" or "val")."""
    ds = ray.data.read_parquet(token_files(tokens_dir)).select_columns(COLUMNS)
    return ds.map_batches(
        to_training_rows,
        batch_format="pyarrow",
        fn_kwargs=dict(codebook=codebook, max_frames=max_frames, pad_id=pad_id, split=split),
    )


def count_split(tokens_dir: str | Path, split: str) -> int:
    """Rows of a split, read from the Parquet footers' column (cheap: one string column)."""
    return sum(
        pc.sum(pc.equal(pq.read_table(f, columns=["split"]).column("split"), split)).as_py() or 0
        for f in token_files(tokens_dir)
    )


class EpochBatches:
    """Micro-batches of one worker's shard, epoch by epoch.

    Each epoch of a Ray Data shard starts a streaming execution, which costs seconds: nothing next to an
    epoch of MTG-Jamendo, but everything on a demo corpus. So a shard with at most `cache_rows` rows is kept
    in memory after its first epoch and later epochs are reshuffled from memory (seeded by the epoch, so a
    resumed run replays the same order). Larger shards stream every epoch.
    """

    def __init__(self, shard, batch_size: int, *, cache_rows: int = 4096, seed: int = 0, drop_last: bool = True):
        self.shard = shard
        self.batch_size = batch_size
        self.cache_rows = cache_rows
        self.seed = seed
        self.drop_last = drop_last
        self.rows: dict[str, np.ndarray] | None = None

    def epoch(self, epoch: int):
        """Yield numpy batches {"tokens": (B, T+1), "text": ragged} for `epoch`."""
        if self.rows is not None:
            n = len(self.rows["tokens"])
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            stop = n - n % self.batch_size if self.drop_last else n
            for i in range(0, stop, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield {k: v[idx] for k, v in self.rows.items()}
            return
        seen: list[dict[str, np.ndarray]] = []
        count = 0
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False):
            count += len(batch["tokens"])
            if count <= self.cache_rows:
                seen.append(batch)
            if len(batch["tokens"]) == self.batch_size or not self.drop_last:
                yield batch
        if seen and count <= self.cache_rows:
            text = np.empty(count, dtype=object)
            text[:] = [t for b in seen for t in b["text"]]
            self.rows = {"tokens": np.concatenate([np.asarray(list(b["tokens"])) for b in seen]), "text": text}
