"""A small generated corpus in the MTG-Jamendo layout: synthesized music, metadata and every bad input.

`writer.make_corpus(out_dir, n_tracks)` writes what the preprocessing pipeline reads from the real dataset:

    out_dir/raw_30s_cleantags_50artists.tsv   TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION, then one field per tag
    out_dir/audio/NN/ID.mp3                    mono 44.1 kHz MP3 (NN = last two digits of the numeric id)
    out_dir/song_describer.csv                 the Song Describer Dataset's columns (caption_id, track_id, caption,
                                               is_valid_subset, familiarity, artist_id, album_id, path, duration)
                                               for the `sdd` tracks: integer ids as SDD has them, `path` relative
                                               to out_dir/audio (so `simba-ttm make-evalset` reads it as it is)
    out_dir/captions.jsonl                     {"track_id": "track_...", "caption": "..."} per track, then
                                               {"track_id": ..., "clip_start": 30.0, "caption": ...} per 30 s clip
    out_dir/corpus.json                        what each track is and what the pipeline should do with it

Each track is planned from a seeded RNG (genre, tempo, key, mode, instruments, moods) and rendered with
numpy only: FM and wavetable tones with envelopes for bass, chords and melody, drum hits from decaying
sines and filtered noise, and on "vocals" tracks a singing voice (a vibrato sawtooth through vowel
formants). Tags and captions say what was synthesized. The kinds of track (`corpus.json`):

    good        plain music, every 30 s window usable
    vocals      has a voice part, tagged `instrument---voice`; its caption mentions vocals
    silence     20-24 s of digital silence inside one 30 s window (the silence rule's work)
    sdd         listed in song_describer.csv, so held out of training
  and with `bad=True` one of each bad input:
    corrupt     random bytes named .mp3          empty       a 0-byte .mp3
    missing     a row whose PATH does not exist  nonfinite   a float32 WAV holding NaN and inf samples
    short       a 12 s track (no full 30 s clip) malformed   a TSV row with 4 fields and no DURATION
    no_caption  a valid track left out of captions.jsonl

Everything is a function of the seed: the text files are byte-identical and `synthesize` returns the same
samples for the same seed (the MP3 encoder then sees the same input).

Three modules, one idea each (imports point down the list):
    writer.py   the Jamendo-format files: metadata text, captions, corpus.json, audio files, `make_corpus`
    tracks.py   what a track is: kinds, genre styles, the seeded plan (`TrackSpec`), arrangement, `synthesize`
    synth.py    music synthesis with numpy: music theory, oscillators and envelopes, instruments, drums, a voice
"""
