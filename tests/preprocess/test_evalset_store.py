"""The eval set's storage: what is written is read back, in CSV order, with 16-bit references."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.preprocess.evalset import PCM_SCALE, read_evalset, to_pcm16, write_evalset_part


def _row(i: int, rng: np.random.Generator, n: int = 4410) -> dict:
    return dict(
        index=i,
        caption_id=str(100 + i),
        track_id=f"{i // 2:07d}",
        caption=f"caption {i}",
        text_emb=rng.standard_normal((3 + i, 8)).astype(np.float16),
        audio=rng.uniform(-1.2, 1.2, n).astype(np.float32),
        sample_rate=44100,
        codes=rng.integers(0, 1024, (9, 9)).astype(np.int16),
    )


def test_parts_read_back_in_csv_order_and_limit_takes_the_first(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_row(i, rng) for i in range(5)]
    write_evalset_part([rows[3], rows[0]], tmp_path)
    write_evalset_part([rows[4], rows[1], rows[2]], tmp_path)
    assert write_evalset_part([], tmp_path) is None

    s = read_evalset(tmp_path)
    assert s.captions == [f"caption {i}" for i in range(5)]
    assert s.caption_ids == [str(100 + i) for i in range(5)] and s.sample_rate == 44100
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(s.codes[i], r["codes"])
        np.testing.assert_array_equal(s.text_emb[i], r["text_emb"])
        # 16-bit PCM: clipped to [-1, 1], within half a step
        assert np.abs(s.audio[i] - np.clip(r["audio"], -1, 1)).max() <= 0.5 / PCM_SCALE + 1e-7
    assert s.audio.dtype == np.float32 and s.audio.shape == (5, 4410)

    text, lengths = s.text_batch([1, 4])
    assert text.shape == (2, 7, 8) and list(lengths) == [4, 7]
    assert not text[0, 4:].any()
    assert read_evalset(tmp_path, limit=2).captions == ["caption 0", "caption 1"]


def test_pcm16_rounds_and_clips():
    np.testing.assert_array_equal(
        to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, 0.5 / PCM_SCALE * 0.9])), [0, 32767, -32767, 32767, 0]
    )


def test_a_missing_set_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-evalset"):
        read_evalset(tmp_path / "nowhere")


def test_the_shared_tiny_evalset_fixture(tiny_evalset):
    from tests.conftest import EVALSET_CAPTIONS

    s = read_evalset(tiny_evalset)
    assert s.captions == [c for _, c in EVALSET_CAPTIONS] and s.audio.shape == (6, 88200)
    assert all(c.shape[0] == 9 and c.shape[1] == s.codes[0].shape[1] for c in s.codes)
