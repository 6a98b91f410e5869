"""The generated Jamendo-format corpus: layout, audio, every bad input, determinism and the synthesizer."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from pipelines.preprocess.corpus import synth, tracks, writer
from ray_jobs.make_corpus import main

N_TRACKS = 6
SHORT = dict(min_seconds=30.0, max_seconds=32.0)
VOCAL_WORDS = re.compile(r"\b(vocals?|voice|sing\w*|sung)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> writer.CorpusManifest:
    return writer.make_corpus(tmp_path_factory.mktemp("corpus"), N_TRACKS, bad=True, seed=3, progress=False, **SHORT)


def _tsv_rows(manifest: writer.CorpusManifest) -> list[list[str]]:
    with manifest.tsv_path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def _silent_seconds(x: np.ndarray, frame: int = synth.SR // 10) -> float:
    """Seconds of 100 ms frames below -60 dBFS RMS."""
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    return float((np.sqrt((frames**2).mean(axis=1)) < 1e-3).sum() * frame / synth.SR)


def test_kinds_cover_everything(corpus):
    kinds = sorted(corpus.kinds.values())
    expected = {"sdd": 1, "vocals": 2, "silence": 1, "good": 2} | {k: 1 for k in tracks.BAD_KINDS}
    assert {k: kinds.count(k) for k in set(kinds)} == expected
    assert writer.CorpusManifest.load(corpus.root) == corpus


def test_the_number_of_held_out_tracks_can_be_chosen():
    kinds = [s.kind for s in tracks.plan_corpus(15, sdd_tracks=4, min_seconds=31, max_seconds=40)]
    assert kinds.count("sdd") == 4 and kinds.count("good") >= 1 and len(kinds) == 15
    default = [s.kind for s in tracks.plan_corpus(15, min_seconds=31, max_seconds=40)]
    assert default.count("sdd") == 2  # about 10%


def test_tsv_has_fixed_fields_then_variable_tags(corpus):
    header, *rows = _tsv_rows(corpus)
    assert header == ["TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS"]
    assert [r[0] for r in rows] == corpus.ids()  # one row per track, in track-id order
    well_formed = [r for r in rows if corpus.kinds[r[0]] != "malformed"]
    assert len({len(r) for r in well_formed}) > 1, "the number of tag fields should vary by row"
    for track_id, artist_id, album_id, path, duration, *tags in well_formed:
        number = int(re.fullmatch(r"track_(\d{7})", track_id).group(1))
        assert re.fullmatch(r"artist_\d{6}", artist_id) and re.fullmatch(r"album_\d{6}", album_id)
        ext = "wav" if corpus.kinds[track_id] == "nonfinite" else "mp3"
        assert path == f"{number % 100:02d}/{number}.{ext}"
        assert float(duration) == corpus.track(track_id).duration
        assert tags and all(re.fullmatch(r"(genre|instrument|mood/theme)---[a-z]+", t) for t in tags)
        assert tuple(tags) == corpus.track(track_id).tags
        assert sum(t.startswith("genre---") for t in tags) == 1


@pytest.mark.parametrize("kind", ["good", "vocals", "silence", "sdd", "short", "malformed", "no_caption"])
def test_music_tracks_decode_to_mono_44k_of_stated_duration(corpus, kind):
    for track_id in corpus.ids(kind):
        x, sr = sf.read(corpus.audio_path(track_id), dtype="float32")
        assert sr == 44100 and x.ndim == 1
        assert abs(len(x) / sr - corpus.track(track_id).duration) <= 0.1
        assert np.isfinite(x).all() and 0.1 < np.abs(x).max() <= 1.0


def test_bad_inputs_are_bad_in_their_own_way(corpus):
    (corrupt,) = corpus.ids("corrupt")
    (empty,) = corpus.ids("empty")
    (missing,) = corpus.ids("missing")
    (nonfinite,) = corpus.ids("nonfinite")
    (short,) = corpus.ids("short")
    (malformed,) = corpus.ids("malformed")

    assert corpus.audio_path(corrupt).stat().st_size > 0
    assert corpus.audio_path(empty).stat().st_size == 0
    for track_id in (corrupt, empty):
        with pytest.raises(sf.LibsndfileError):
            sf.read(corpus.audio_path(track_id))
    assert not corpus.audio_path(missing).exists()

    path = corpus.audio_path(nonfinite)
    assert path.suffix == ".wav" and sf.info(path).subtype == "FLOAT"
    x, sr = sf.read(path, dtype="float32")
    assert sr == 44100 and np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()

    assert corpus.track(short).duration < tracks.WINDOW_SECONDS

    (row,) = [r for r in _tsv_rows(corpus) if r[0] == malformed]
    assert len(row) < 5
    with pytest.raises(ValueError):
        float(row[4] if len(row) > 4 else row[-1])
    assert corpus.audio_path(malformed).is_file()  # only the row is wrong


def test_captions_cover_all_but_one_and_mention_vocals_only_with_a_voice(corpus):
    lines = [json.loads(line) for line in corpus.captions_path.read_text(encoding="utf-8").splitlines()]
    captions = {o["track_id"]: o["caption"] for o in lines if "clip_start" not in o}  # track-level
    clips = {(o["track_id"], o["clip_start"]): o["caption"] for o in lines if "clip_start" in o}
    assert len(captions) + len(clips) == len(lines)
    assert set(captions) == set(corpus.ids()) - set(corpus.ids("no_caption"))
    assert {t for t, _ in clips} == set(captions) - set(corpus.ids("short"))  # a 12 s track has no clip
    for track_id, text in captions.items():
        track = corpus.track(track_id)
        assert text == track.caption
        starts = sorted(s for t, s in clips if t == track_id)
        assert starts == [30.0 * i for i in range(int(track.duration // 30))]  # one per full 30 s clip
        for start in starts:
            assert bool(VOCAL_WORDS.search(clips[track_id, start])) == track.voice
        assert bool(VOCAL_WORDS.search(text)) == track.voice == ("instrument---voice" in track.tags)
    assert {corpus.track(t).voice for t in corpus.ids("vocals")} == {True}
    assert any(text != captions[t] for (t, _), text in clips.items())  # worded per clip, not the track's copied


def test_song_describer_csv_names_the_sdd_tracks(corpus):
    with corpus.sdd_csv_path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == writer.SDD_HEADER
    assert writer.SDD_HEADER[:3] == ("caption_id", "track_id", "caption") and "path" in writer.SDD_HEADER
    assert rows and all(r["caption"] for r in rows)
    ids = {f"track_{int(r['track_id']):07d}" for r in rows}  # integer ids, as the real SDD has them
    assert ids <= set(corpus.ids()) and ids == set(corpus.ids("sdd"))
    assert len({r["caption_id"] for r in rows}) == len(rows)
    for r in rows:  # the SDD columns point at the track's own audio, relative to the audio folder
        track = corpus.track(f"track_{int(r['track_id']):07d}")
        assert corpus.audio_dir / r["path"] == corpus.audio_path(track.track_id)
        assert (corpus.audio_dir / r["path"]).is_file()
        assert float(r["duration"]) == track.duration and r["is_valid_subset"] in ("True", "False")
        assert int(r["familiarity"]) in range(6) and r["artist_id"].isdigit() and r["album_id"].isdigit()


def test_silence_track_has_a_mostly_silent_window_and_others_do_not(corpus):
    window = int(tracks.WINDOW_SECONDS * synth.SR)
    for track_id in corpus.ids("silence", "good", "vocals", "sdd"):
        track = corpus.track(track_id)
        x, _ = sf.read(corpus.audio_path(track_id), dtype="float32")
        silent = [_silent_seconds(x[k * window : (k + 1) * window]) for k in range(len(x) // window)]
        if track.kind == "silence":
            start, end = track.silences[0]
            assert end - start >= 20.0
            assert silent[int(start // tracks.WINDOW_SECONDS)] > 15.0, silent
        else:
            assert max(silent) < 5.0, (track_id, silent)


def test_vocals_tracks_have_a_voice_stem():
    specs = tracks.plan_corpus(8, seed=5, min_seconds=30.0, max_seconds=30.0)
    vocals = next(s for s in specs if s.kind == "vocals")
    plain = next(s for s in specs if s.kind == "good")
    stems = tracks.render_stems(vocals)
    voice_rms = np.sqrt(np.mean(stems["voice"] ** 2))
    print(f"voice rms {voice_rms:.3f}, mix rms {np.sqrt(np.mean(sum(stems.values()) ** 2)):.3f}")
    assert voice_rms > 0.02
    assert "voice" not in tracks.render_stems(plain)


def _pitch(x: np.ndarray, lo: float = 80.0, hi: float = 1000.0) -> float:
    """Autocorrelation pitch (Hz) with parabolic interpolation of the peak."""
    x = x - x.mean()
    ac = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * len(x))) ** 2)[: len(x)]
    a, b = int(synth.SR / hi), int(synth.SR / lo)
    k = a + int(np.argmax(ac[a:b]))
    y0, y1, y2 = ac[k - 1 : k + 2]
    return synth.SR / (k + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2))


def _band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / synth.SR)
    return float(spec[(f >= lo) & (f < hi)].sum() / spec.sum())


def test_sing_follows_the_notes_and_shapes_vowels():
    n = 2 * synth.SR
    notes = [(0.1, 1.6, 57.0, 1.0)]  # A3, 220 Hz
    a = synth.sing(notes, ["a"], n, vibrato_semitones=0.0)
    i = synth.sing(notes, ["i"], n, vibrato_semitones=0.0)
    steady = slice(int(0.5 * synth.SR), int(1.0 * synth.SR))
    for x in (a, i):
        assert np.isfinite(x).all() and x[: int(0.09 * synth.SR)].max() == 0.0
        assert abs(_pitch(x[steady]) / 220.0 - 1) < 0.01
    # "a" has its first formant near 800 Hz, "i" its second near 1700 Hz.
    assert _band_energy(a[steady], 700, 950) > 2 * _band_energy(i[steady], 700, 950)
    assert _band_energy(i[steady], 1550, 1850) > 2 * _band_energy(a[steady], 1550, 1850)
    # Vibrato moves the pitch by about +-0.3 semitone (+-1.7%) once it sets in.
    wobbly = synth.sing(notes, ["a"], n)
    pitches = [_pitch(wobbly[s : s + 2048]) for s in range(int(0.7 * synth.SR), int(1.5 * synth.SR), 1024)]
    spread = max(pitches) / min(pitches) - 1
    print(f"vibrato spread {spread:.4f}")
    assert 0.015 < spread < 0.06


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    kw = dict(seed=1, min_seconds=30.0, max_seconds=30.5, progress=False)
    one = writer.make_corpus(tmp_path / "one", 2, **kw)
    two = writer.make_corpus(tmp_path / "two", 2, **kw)
    for name in (writer.TSV_NAME, writer.SDD_NAME, writer.CAPTIONS_NAME, writer.MANIFEST_NAME):
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes(), name
    for track_id in one.ids():
        assert np.array_equal(sf.read(one.audio_path(track_id))[0], sf.read(two.audio_path(track_id))[0])

    def short_audio(seed: int) -> list[np.ndarray]:
        specs = tracks.plan_corpus(3, seed=seed, bad=True, min_seconds=30.0, max_seconds=30.0)
        return [tracks.synthesize(dataclasses.replace(s, seconds=4.0, silences=())) for s in specs if s.rendered]

    same = short_audio(1)
    for x, y in zip(same, short_audio(1), strict=True):
        assert np.array_equal(x, y, equal_nan=True)
    assert len(same) == 3 + 4  # the music tracks + nonfinite, short, malformed, no_caption
    other = short_audio(2)
    assert all(not np.array_equal(x, y, equal_nan=True) for x, y in zip(same, other, strict=True))
    assert writer.tsv_text(tracks.plan_corpus(2, seed=2, **SHORT)) != one.tsv_path.read_text(encoding="utf-8")


def test_plan_kind_counts_and_argument_checks():
    counts = [s.kind for s in tracks.plan_corpus(20)]
    assert {k: counts.count(k) for k in tracks.GOOD_KINDS} == {"good": 9, "vocals": 5, "silence": 4, "sdd": 2}
    assert [s.kind for s in tracks.plan_corpus(1)] == ["good"]
    assert all(60.0 <= s.seconds <= 100.0 for s in tracks.plan_corpus(20))
    with pytest.raises(ValueError, match="min_seconds"):
        tracks.plan_corpus(3, min_seconds=20.0)
    with pytest.raises(ValueError, match="n_tracks"):
        tracks.plan_corpus(0)


def test_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--tracks", "2", "--seed", "4", "--min-seconds", "30", "--max-seconds", "30"]
    argv += ["--workers", "2"]  # the spawned-process path; files do not depend on it
    assert main(argv) == 0
    manifest = writer.CorpusManifest.load(out)
    assert manifest.ids() and all(manifest.audio_path(t).is_file() for t in manifest.ids())
    assert (
        (out / writer.TSV_NAME).is_file()
        and (out / writer.SDD_NAME).is_file()
        and (out / writer.CAPTIONS_NAME).is_file()
    )
    assert "make-corpus [2/2]" in capsys.readouterr().out
    serial = writer.make_corpus(tmp_path / "serial", 2, seed=4, min_seconds=30, max_seconds=30, progress=False)
    for track_id in serial.ids():
        assert np.array_equal(sf.read(serial.audio_path(track_id))[0], sf.read(manifest.audio_path(track_id))[0])
    assert main(["--out", str(tmp_path / "short"), "--tracks", "2", "--min-seconds", "10"]) == 2
    assert "min_seconds" in capsys.readouterr().err


def test_a_folder_holding_a_corpus_or_a_file_is_refused_before_anything_is_written(corpus, tmp_path, capsys):
    """Writing into an earlier corpus would overwrite its files of the same name and leave the others: preprocessing
    would read a mix of the two. Either of its text files marks a corpus."""
    argv = ["--tracks", "1", "--min-seconds", "30", "--max-seconds", "30", "--workers", "1"]
    for name in (writer.TSV_NAME, writer.MANIFEST_NAME):
        old = tmp_path / name.replace(".", "_")
        old.mkdir()
        shutil.copy(corpus.root / name, old / name)
        assert main(["--out", str(old), *argv]) == 2
        err = capsys.readouterr().err
        print(err)
        assert err.count("\n") == 1 and err.startswith(f"simba-ttm make-corpus: --out {old} already holds a corpus")
        assert f"of {len(corpus.tracks)} tracks" in err and "delete the folder, or choose another" in err
        with pytest.raises(writer.CorpusExistsError, match=name):  # library callers too
            writer.make_corpus(old, 1, progress=False, **SHORT)
        assert [p.name for p in old.iterdir()] == [name]
    readme = tmp_path / "README.md"
    readme.write_text("not a folder\n")
    for out, says in ((readme, "is a file"), (readme / "corpus", f"lies under a file, {readme}")):
        assert main(["--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"simba-ttm make-corpus: --out {out} {says}\n"
    assert readme.read_text() == "not a folder\n"
