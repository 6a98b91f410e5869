"""The training reader over real Parquet: row contents, seeded epochs, disjoint worker shards, resumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.preprocess.tokens import tokens_table, write_part
from pipelines.train.dataset import EpochBatches, TokenSplit, collate, rank_rows


def _rows(n: int, split: str, rng: np.random.Generator, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        frames = int(rng.integers(5, 40))
        caption = int(rng.integers(1, 9))
        rows.append(dict(
            track_id=f"track_{i:04d}", artist_id="a", clip_start=0.0, caption=f"caption {i}",
            codes=rng.integers(0, 1024, size=(9, frames), dtype=np.int16), n_frames=frames,
            text_emb=rng.standard_normal((caption, 8)).astype(np.float16), text_len=caption, split=split,
        ))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A token table of 3 Parquet parts: 45 training rows and 6 validation rows interleaved."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("tokens")
    rows = []
    for part in range(3):
        chunk = _rows(15, "train", rng, start=20 * part) + _rows(2, "val", rng, start=20 * part + 15)
        write_part(tokens_table(chunk), directory)
        rows += chunk
    return directory, {r["track_id"]: r for r in rows}


def _read(table, split="train", max_frames=32):
    return TokenSplit.read(table[0], split, codebook=0, max_frames=max_frames, pad_id=1024)


def test_rows_hold_codebook_0_with_bos_and_padding_and_their_caption(table):
    split = _read(table)
    assert len(split) == 45 and len(_read(table, "val")) == 6
    for i in range(len(split)):
        row = table[1][split.track_ids[i]]
        frames = row["codes"][0][:32]
        assert split.tokens[i, 0] == 1024
        np.testing.assert_array_equal(split.tokens[i, 1 : 1 + len(frames)], frames)
        assert (split.tokens[i, 1 + len(frames) :] == 1024).all()
        np.testing.assert_array_equal(split.text[split.text_offsets[i] : split.text_offsets[i + 1]], row["text_emb"])


def test_collated_batch_is_shifted_and_text_padded(table):
    split = _read(table)
    batch = collate(split.batch(np.array([0, 1, 2])))
    assert batch["inputs"].shape == batch["targets"].shape == (3, 32)
    assert (batch["inputs"][:, 0] == 1024).all()
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    lengths = [table[1][t]["text_len"] for t in split.track_ids[:3]]
    assert batch["text_mask"].sum(1).tolist() == lengths
    assert batch["text"].shape == (3, max(lengths), 8) and (batch["text"][~batch["text_mask"]] == 0).all()


def _track_ids(batches: EpochBatches, epoch: int, start: int = 0) -> list[str]:
    return [t for b in batches.epoch(epoch, start) for t in b["track_id"]]


def test_every_epoch_is_a_fresh_seeded_permutation(table):
    split = _read(table)
    batches = EpochBatches(split, 5, seed=7)  # 45 rows = 9 whole micro-batches: nothing left out
    first, second = _track_ids(batches, 0), _track_ids(batches, 1)
    assert first != second and sorted(first) == sorted(second) == sorted(split.track_ids)
    position = {t: i for i, t in enumerate(split.track_ids)}
    for order in (first, second):  # a permutation of rows, not of file parts read in a varying order
        in_file_order = sum(position[b] == position[a] + 1 for a, b in zip(order, order[1:], strict=False))
        assert in_file_order < 5, f"{in_file_order} of 44 neighbours are file neighbours"
    assert _track_ids(EpochBatches(split, 5, seed=7), 1) == second  # the same seed: the same order
    assert _track_ids(EpochBatches(split, 5, seed=8), 1) != second


def test_two_workers_get_disjoint_equal_shards(table):
    split = _read(table)
    ranks = [EpochBatches(split, 4, seed=3, rank=r, world=2) for r in range(2)]
    for epoch in range(3):
        shards = [_track_ids(r, epoch) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == 20  # 45 // 2 = 22 -> 5 whole micro-batches of 4 each
        assert not set(shards[0]) & set(shards[1])
    left_out = [set(split.track_ids) - set(_track_ids(ranks[0], e)) - set(_track_ids(ranks[1], e)) for e in range(3)]
    assert left_out[0] != left_out[1]  # the tail a worker could not fill moves with the permutation


def test_a_resumed_epoch_continues_where_it_stopped(table):
    batches = EpochBatches(_read(table), 4, seed=1, rank=1, world=3)
    assert _track_ids(batches, 2, start=2) == _track_ids(batches, 2)[8:]


def test_validation_order_covers_every_row_once_across_workers(table):
    split = _read(table, "val")
    shards = [_track_ids(EpochBatches(split, 4, rank=r, world=4, shuffle=False, drop_last=False), 0) for r in range(4)]
    assert sorted(t for s in shards for t in s) == sorted(split.track_ids)


@pytest.mark.parametrize("n,world,batch", [(10, 1, 3), (10, 3, 2), (7, 2, 1), (101, 4, 8), (3, 4, 1)])
def test_rank_rows_are_disjoint_and_equal(n, world, batch):
    shards = [rank_rows(n, epoch=5, seed=0, rank=r, world=world, batch_size=batch) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % batch == 0
    assert len(shards[0]) == (n // world) // batch * batch
    everything = np.concatenate(shards)
    assert len(set(everything.tolist())) == len(everything)


def test_too_little_data_for_one_micro_batch_per_worker_is_a_clear_error(table):
    with pytest.raises(ValueError, match="cannot fill one micro-batch of 4 on each of 2 workers"):
        next(EpochBatches(_read(table, "val"), 4, world=2).epoch(0))


def test_a_split_without_rows_reads_as_empty(table):
    assert len(_read(table, "test")) == 0
