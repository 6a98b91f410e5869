"""Audio preparation shared by the metrics: resampling keeps pitch, shapes and cuts are what the metrics expect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.audio import as_batch, peak_normalize, prepare, resample, split_segments

SR = 44100


def sine(freq: float, seconds: float, sample_rate: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)


@pytest.mark.parametrize("to_rate", [16_000, 32_000, 48_000])
@pytest.mark.parametrize("freq", [440.0, 1000.0, 5512.5])
def test_resampling_keeps_a_sine_at_its_frequency(to_rate, freq):
    seconds = 2.0
    y = resample(torch.from_numpy(sine(freq, seconds))[None], SR, to_rate)[0].double().numpy()
    assert y.shape == (int(seconds * to_rate),)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1.0 / to_rate)
    peak = freqs[spectrum.argmax()]
    print(f"{SR} -> {to_rate}: {freq} Hz peaks at {peak} Hz")
    assert abs(peak - freq) <= 1.0 / seconds  # within one FFT bin (0.5 Hz)
    # and its level: a sine of amplitude 0.5 has an RMS of 0.5 / sqrt(2) (away from the edges)
    mid = y[len(y) // 4 : -len(y) // 4]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-2)


def test_resampling_removes_what_the_new_rate_cannot_hold():
    # 12 kHz is above 16 kHz's Nyquist frequency: it must not fold back into the band as an alias at 4 kHz.
    y = resample(torch.from_numpy(sine(12_000.0, 1.0))[None], SR, 16_000)[0].numpy()
    assert np.sqrt(np.mean(y[4000:-4000] ** 2)) < 1e-2


def test_same_rate_is_untouched():
    x = torch.randn(2, 100)
    assert resample(x, 32_000, 32_000) is x


def test_as_batch_shapes():
    assert as_batch(np.zeros(10)).shape == (1, 10)
    assert as_batch(np.zeros((3, 10))).shape == (3, 10)
    stereo = torch.stack([torch.ones(2, 10), -torch.ones(2, 10)], dim=1)  # (B=2, C=2, T)
    assert as_batch(stereo).shape == (2, 10) and as_batch(stereo).abs().max() == 0  # channels averaged
    assert as_batch([np.zeros(5), np.ones(5)]).tolist()[1] == [1.0] * 5
    assert as_batch(np.zeros(10, dtype=np.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(T,\), \(B, T\) or \(B, C, T\)"):
        as_batch(np.zeros((1, 1, 1, 10)))


def test_prepare_cuts_to_the_first_seconds():
    x = np.arange(3 * SR, dtype=np.float32)[None] / (3 * SR)  # a ramp: its first second is the smallest values
    y = prepare(x, SR, 16_000, seconds=1.0)
    assert y.shape == (1, 16_000) and float(y.max()) < 0.34
    assert prepare(x, SR, 16_000).shape == (1, 48_000)


def test_split_segments_drops_only_a_short_tail():
    x = torch.arange(25)
    assert [s.tolist() for s in split_segments(x, 10, min_length=5)] == [list(range(10)), list(range(10, 20))]
    assert [len(s) for s in split_segments(torch.arange(26), 10, min_length=5)] == [10, 10, 6]
    assert [len(s) for s in split_segments(torch.arange(4), 10, min_length=5)] == []


def test_peak_normalize():
    x = torch.tensor([[0.1, -0.5, 0.2], [0.0, 0.0, 0.0]])
    y = peak_normalize(x, headroom_db=1.0)
    assert float(y[0].abs().max()) == pytest.approx(10 ** (-1 / 20))
    assert torch.allclose(y[0] / y[0, 1], x[0] / x[0, 1]) and not y[1].any()
