"""The train/val split rules (data.split): hash of the track id, artist-disjoint, or MTG-Jamendo's split files."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from configs import load_config
from configs.schema import ConfigError, DataConfig
from pipelines.preprocess.graph import run_preprocess, split_rule
from pipelines.preprocess.jamendo import read_metadata, read_split_ids
from pipelines.preprocess.steps import OK, batch_of, write_step
from pipelines.preprocess.tokens import SplitRule, read_tokens, split_of
from tests.conftest import preprocess_config

# The first lines of MTG-Jamendo's data/splits/split-0/autotagging-validation.tsv (the metadata TSV's layout).
OFFICIAL_HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"
OFFICIAL_ROWS = [
    "track_0000773\tartist_000104\talbum_000126\t73/773.mp3\t275.3\tgenre---electronic",
    "track_0001729\tartist_000264\talbum_000252\t29/1729.mp3\t270.2\tgenre---pop\tgenre---poprock\tgenre---rock",
]


def test_hash_is_the_default_and_matches_split_of():
    rule = split_rule(DataConfig(val_fraction=0.3, seed=5))
    assert DataConfig().split == "hash" and rule.kind == "hash"
    ids = [f"track_{i:07d}" for i in range(300)]
    assert [rule(t, "artist_000001") for t in ids] == [split_of(t, 0.3, 5) for t in ids]


def test_artist_split_never_shares_an_artist_on_the_generated_corpus(corpus):
    tracks, _ = read_metadata(corpus.tsv_path)
    artists = {t.artist_id for t in tracks}
    assert len(artists) >= 3 and len(tracks) > len(artists)  # artists with several tracks: the property can fail
    sides = defaultdict(set)
    for seed in range(5):
        rule = split_rule(DataConfig(split="artist", val_fraction=0.5, seed=seed))
        for t in tracks:
            sides[seed, t.artist_id].add(rule(t.track_id, t.artist_id))
    assert all(len(s) == 1 for s in sides.values())
    # both splits are used, and which artists are val depends on the seed
    assert {next(iter(s)) for s in sides.values()} == {"train", "val"}
    assert len({frozenset(a for (seed, a), s in sides.items() if seed == k and s == {"val"}) for k in range(5)}) > 1


def test_artist_split_is_proportional_in_artists():
    rule = SplitRule("artist", val_fraction=0.1, seed=0)
    artists = [f"artist_{i:06d}" for i in range(3000)]
    share = sum(rule("track_0000001", a) == "val" for a in artists) / len(artists)
    assert abs(share - 0.1) < 0.02


def test_official_split_file(tmp_path):
    path = tmp_path / "autotagging-validation.tsv"
    path.write_text("\n".join([OFFICIAL_HEADER, *OFFICIAL_ROWS, "", "214\tartist_1\talbum_1\t14/214.mp3\t1.0"]) + "\n")
    assert read_split_ids(path) == {"track_0000773", "track_0001729", "track_0000214"}
    rule = split_rule(DataConfig(split="file", split_file=str(path)))
    assert rule("track_0001729", "artist_000264") == "val" and rule("track_0000214", "x") == "val"
    assert rule("track_0000774", "artist_000104") == "train"  # not listed: train, even for a listed track's artist

    path.write_text(OFFICIAL_HEADER + "\nnot-an-id\ta\tb\tc\t1\n")
    with pytest.raises(ConfigError, match="data.split_file: .* line 2: unreadable track id 'not-an-id'"):
        split_rule(DataConfig(split="file", split_file=str(path)))


def test_split_file_is_required_and_checked_before_any_work(corpus, tiny_pretrained, tmp_path):
    with pytest.raises(ConfigError, match="data.split is 'file' but data.split_file is not set"):
        load_config("debug", ["data.split=file"])
    with pytest.raises(ConfigError, match="data.split must be one of 'hash', 'file', 'artist'"):
        load_config("debug", ["data.split=album"])
    missing = tmp_path / "splits" / "autotagging-validation.tsv"
    cfg = preprocess_config(corpus, tiny_pretrained, tmp_path, "data.split=file", f"data.split_file={missing}")
    with pytest.raises(ConfigError, match=f"data.split_file {missing} does not exist"):
        run_preprocess(cfg, check_pretrained=False)
    assert not (tmp_path / "rejects").exists() and not (tmp_path / "tokens").exists()


def test_write_step_stores_the_rule_s_split(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        dict(track_id=f"track_{i:07d}", artist_id=f"artist_{i % 3:06d}", status=OK, stage="", reason="",
             clip_rejects="[]", clip_start=0.0, caption="a calm piano piece",
             codes=rng.integers(0, 1024, (9, 5)).astype(np.int16), text_emb=np.zeros((2, 4), np.float16), text_len=2)
        for i in range(12)
    ]  # fmt: skip
    rule = SplitRule("artist", val_fraction=0.5, seed=1)
    write_step(batch_of(rows), tokens_dir=str(tmp_path / "tokens"), rejects_dir=str(tmp_path / "rejects"), split=rule)
    tokens = read_tokens(tmp_path / "tokens", ["track_id", "artist_id", "split"]).to_pylist()
    assert len(tokens) == 12 and all(r["split"] == rule(r["track_id"], r["artist_id"]) for r in tokens)
    by_artist = defaultdict(set)
    for r in tokens:
        by_artist[r["artist_id"]].add(r["split"])
    assert all(len(s) == 1 for s in by_artist.values())
