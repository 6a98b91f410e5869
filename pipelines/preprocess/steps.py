"""The steps of the preprocessing pipeline, one row (a track) at a time: plain functions and callable classes that
Ray Data runs as tasks and actor pools (`pipelines/preprocess/graph.py` wires them), testable without Ray.

    decode_step      decode + resample + 30 s clips, stereo kept; ships the clip selection tries first (CPU task)
    ClipSelector     HTDemucs vocal removal, silence rule, tag/file captions, vocal-cue filter (actor)
    WindowCaptioner  captions: model, stage 1: an audio-language model captions each window (actor)
    CaptionRephraser captions: model, stage 2: an LLM rephrases them into one; vocal-cue filter (actor)
    CodecEncoder     DAC codes of the kept clip (actor)
    CaptionEmbedder  Flan-T5 embedding of its caption (actor)
    write_step       Parquet parts named after their tracks (exactly once under retries)

Every row carries a status; rejections travel with the data instead of raising, so one bad file never stops
the job and nothing is dropped silently. Batches are dicts of columns (`batch_of`), rows dicts (`rows_of`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import numpy as np

from configs.schema import ExperimentConfig
from modeling.pretrained.codec import encode_codes, load_codec
from modeling.pretrained.separator import load_separator, remove_vocals
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.preprocess.audio import TrackClips, clip_order, decode_track
from pipelines.preprocess.captioning import (
    AudioCaptioner,
    CaptionCache,
    Rephraser,
    caption_cache_dir,
    caption_key,
    split_windows,
)
from pipelines.preprocess.captions import build_captioner
from pipelines.preprocess.filters import DEFAULT_VOCAL_WORDS
from pipelines.preprocess.jamendo import Reject, Track
from pipelines.preprocess.selection import choose_captioned, machine_error, select_clip
from pipelines.preprocess.tokens import (
    SplitRule,
    part_name,
    rejects_table,
    tokens_table,
    write_part,
)

OK = "ok"
REJECTED = "rejected"
DECODE_MEMORY = 512 * 2**20  # bytes a decode task reserves (a scheduling hint; Ray does not enforce it)


def _clip_rejects_json(clip_rejects: list[tuple[float, Reject]]) -> str:
    return json.dumps([dict(asdict(r), clip_start=start) for start, r in clip_rejects])


def _reject_row(row: dict, reject: Reject, clip_rejects: list[tuple[float, Reject]] = ()) -> dict:
    row.update(status=REJECTED, stage=reject.stage, reason=reject.reason, clip_rejects=_clip_rejects_json(clip_rejects))
    return row


# Per-row counts that travel with every row to the status rows write_step returns (summed in the summary):
# the bytes of audio leaving the decode tasks and leaving clip selection, i.e. crossing the object store
# between stages, and how many tracks clip selection had to decode again (their first clip was rejected).
AUDIO_STATS = ("decode_bytes", "select_bytes", "selector_decodes")


def decode_step(row: dict, *, sample_rate: int, clip_seconds: float, seed: int, ship: int = 1) -> dict:
    """Decode (channels kept), resample and clip one track; keep only what clip selection needs first.

    Adds `clip_starts` (n,) for all n clips of the track, and `clips` (k, T, C) float32 with `clip_index` (k,):
    the first k = `ship` clips in `clip_order(track_id, n, seed)`, the order in which selection tries them.
    Selection stops at the first clip that survives, usually the first it tries, so shipping the other clips
    (float32, ~5 MB per mono 30 s) through the object store was mostly wasted; selection decodes the track
    again in the rare case it needs more (`TrackClips`). `decode_bytes` is the size of what is shipped.
    """
    clips, reject = decode_track(
        row["track_id"], row["path"], sample_rate=sample_rate, clip_seconds=clip_seconds, mono=False
    )
    row.update(status=OK, stage="", reason="", clip_rejects="[]")
    if reject is not None:
        row.update(clips=np.zeros((0, 0, 0), np.float32), clip_index=np.zeros(0, np.int64), clip_starts=np.zeros(0))
        row.update(decode_bytes=0)
        return _reject_row(row, reject)
    index = clip_order(str(row["track_id"]), len(clips), seed)[:ship]
    row["clips"] = np.stack([clips[i][1] for i in index]).astype(np.float32, copy=False)  # (k, T, C)
    row["clip_index"] = np.array(index, dtype=np.int64)
    row["clip_starts"] = np.array([s for s, _ in clips], dtype=np.float64)
    row["decode_bytes"] = row["clips"].nbytes
    return row


def rows_of(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data batch (a dict of columns) as a list of row dicts."""
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def batch_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts back to a batch; array values become object columns (ragged: one array per row)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            arr = np.empty(len(values), dtype=object)  # ragged tensors: one array per row
            arr[:] = values
            out[key] = arr
        else:
            out[key] = np.array(values)
    return out


def _track(row: dict) -> Track:
    return Track(**json.loads(str(row["track_json"])))


class ClipSelector:
    """Actor: HTDemucs vocal removal + silence rule + caption + vocal-cue filter; keeps one clip per track.

    With `captions: model` it stops at the first preprocess.caption_candidates clips that survive separation and
    silence and passes them on (`cand_starts`, `cand_audio`) to the caption actors, which choose among them.
    """

    def __init__(self, cfg: dict, device: str = "cpu"):
        p = ExperimentConfig.from_dict(cfg).preprocess
        self.p = p
        self.device = device
        self.model = load_separator(p.separator, device=device, setting="preprocess.separator")
        self.captioner = build_captioner(p.captions, **({"path": p.caption_file} if p.captions == "file" else {}))
        self.words = tuple(p.vocal_words) if p.vocal_words is not None else DEFAULT_VOCAL_WORDS

    def separate(self, audio: np.ndarray) -> np.ndarray:
        """(T, C) stereo or mono clip (or a clip still to decode: np.asarray decodes it) -> (T,) mono, no vocals."""
        # shifts=0: no random time shift, so a rerun separates (and so selects) exactly the same way.
        audio = np.asarray(audio, dtype=np.float32)
        return remove_vocals(self.model, audio, device=self.device, shifts=0, sample_rate=self.p.sample_rate)

    def clips(self, row: dict) -> TrackClips:
        """The track's clips as select_clip reads them: the shipped ones, and the others decoded on demand."""
        shipped = dict(zip(np.asarray(row["clip_index"]).tolist(), row["clips"], strict=True))
        return TrackClips(
            str(row["track_id"]),
            str(row["path"]),
            np.asarray(row["clip_starts"]).tolist(),
            shipped,
            sample_rate=self.p.sample_rate,
            clip_seconds=self.p.clip_seconds,
            mono=False,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in rows_of(batch):
            row.update(audio=np.zeros(0, np.float32), clip_start=-1.0, caption="", select_bytes=0, selector_decodes=0)
            if self.captioner is None:
                row.update(cand_starts=np.zeros(0), cand_audio=np.zeros((0, 0), np.float32))
            clips = self.clips(row)
            for key in ("clips", "clip_index", "clip_starts"):
                del row[key]
            if row["status"] == OK:
                track = _track(row)
                sel = select_clip(
                    track,
                    clips,
                    separate=self.separate,
                    captioner=self.captioner,
                    sample_rate=self.p.sample_rate,
                    seed=self.p.seed,
                    max_silence_seconds=self.p.max_silence_seconds,
                    threshold_db=self.p.silence_threshold_db,
                    vocal_words=self.words,
                    candidates=self.p.caption_candidates,
                )
                if sel.track_reject is not None:
                    _reject_row(row, sel.track_reject, sel.clip_rejects)
                elif sel.candidates:
                    row["cand_starts"] = np.array([s for s, _ in sel.candidates], dtype=np.float64)
                    row["cand_audio"] = np.stack([a for _, a in sel.candidates]).astype(np.float32)  # (k, T)
                    row["clip_rejects"] = _clip_rejects_json(sel.clip_rejects)
                else:
                    row.update(audio=sel.audio, clip_start=sel.clip_start, caption=sel.caption)
                    row["clip_rejects"] = _clip_rejects_json(sel.clip_rejects)
                # What leaves selection: the kept clip, or the candidates for the caption actors (captions: model).
                moved = row["audio"].nbytes + (row["cand_audio"].nbytes if self.captioner is None else 0)
                row.update(select_bytes=moved, selector_decodes=clips.redecodes)
            out.append(row)
        return batch_of(out)


class _CaptionStep:
    """What both caption actors share: the config, the cache of captions made so far, and a model that is loaded
    only when a clip misses the cache (a rerun that finds every caption cached loads nothing)."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        config = ExperimentConfig.from_dict(cfg)
        self.p, self.device = config.preprocess, device
        self.cache = CaptionCache(caption_cache_dir(config), caption_key(self.p))
        self.model = None

    def model_kwargs(self) -> dict:
        p = self.p
        return dict(device=self.device, max_new_tokens=p.caption_max_new_tokens, batch_size=p.caption_batch_size)

    def candidates(self, rows: list[dict]) -> list[tuple[dict, int, float]]:
        """(row, index, clip_start) of every candidate clip of the rows still in the running."""
        return [(row, i, float(s)) for row in rows if row["status"] == OK for i, s in enumerate(row["cand_starts"])]


class WindowCaptioner(_CaptionStep):
    """Actor, stage 1 of `captions: model`: caption each window of each candidate clip (AudioCaptioner), unless the
    cache has it. Adds `cand_windows` (JSON: per candidate, its window captions) and `cand_errors` (JSON: per
    candidate, why the model gave it no caption, or null)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, p = rows_of(batch), self.p
        for row in rows:
            row["cand_windows"] = [None] * len(row["cand_starts"])
            row["cand_errors"] = [None] * len(row["cand_starts"])
        todo = []
        for row, i, start in self.candidates(rows):
            windows, caption = self.cache.get(str(row["track_id"]), start)
            row["cand_windows"][i] = windows
            if windows is None:
                todo.append((row, i, start))
        if todo:
            if self.model is None:
                self.model = AudioCaptioner(p.caption_audio_model, **self.model_kwargs())
            audio = [
                w
                for row, i, _ in todo
                for w in split_windows(row["cand_audio"][i], p.sample_rate, p.caption_windows, p.caption_window_seconds)
            ]
            try:
                texts = self.model(audio, p.sample_rate)
            except Exception as e:  # the batch's clips get no caption and are rejected (with e), the job goes on
                if machine_error(e):
                    raise
                print(f"WindowCaptioner: {type(e).__name__}: {e}", file=sys.stderr)
                texts = [""] * len(audio)
                for row, i, _ in todo:
                    row["cand_errors"][i] = f"the audio captioner failed: {type(e).__name__}: {e}"
            new = []
            for k, (row, i, start) in enumerate(todo):
                windows = texts[k * p.caption_windows : (k + 1) * p.caption_windows]
                row["cand_windows"][i] = windows
                if all(windows):  # a failed batch is not cached: a rerun tries it again
                    new.append((str(row["track_id"]), start, windows, None))
            self.cache.put(new)
        for row in rows:
            row["cand_windows"] = json.dumps(row["cand_windows"])
            row["cand_errors"] = json.dumps(row["cand_errors"])
        return batch_of(rows)


class CaptionRephraser(_CaptionStep):
    """Actor, stage 2 of `captions: model`: rephrase each candidate's window captions into one caption (Rephraser),
    unless the cache has it; then keep the first candidate whose caption passes the vocal-cue rule (its audio,
    start and caption become the row's) and record the others as clip rejects."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        super().__init__(cfg, device)
        p = self.p
        self.words = tuple(p.vocal_words) if p.vocal_words is not None else DEFAULT_VOCAL_WORDS

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, p = rows_of(batch), self.p
        todo, captions = [], {}
        errors = {id(row): json.loads(str(row.pop("cand_errors"))) for row in rows}  # stage 1's, then this stage's
        for row, i, start in self.candidates(rows):
            windows = json.loads(str(row["cand_windows"]))[i]
            cached = self.cache.get(str(row["track_id"]), start)[1]
            captions[id(row), i] = cached
            if cached is None and windows and all(windows):  # a failed stage 1 leaves nothing to rephrase
                todo.append((row, i, start, windows))
        if todo:
            if self.model is None:
                kwargs = dict(self.model_kwargs(), window_seconds=p.caption_window_seconds)
                self.model = Rephraser(p.caption_text_model, **kwargs)
            try:
                texts = self.model([w for *_, w in todo])
            except Exception as e:  # the batch's clips get no caption and are rejected (with e), the job goes on
                if machine_error(e):
                    raise
                print(f"CaptionRephraser: {type(e).__name__}: {e}", file=sys.stderr)
                texts = [""] * len(todo)
                for row, i, _, _ in todo:
                    errors[id(row)][i] = f"the rephraser failed: {type(e).__name__}: {e}"
            for (row, i, _, _), text in zip(todo, texts, strict=True):
                captions[id(row), i] = text
            done = [(str(row["track_id"]), s, w, t) for (row, _, s, w), t in zip(todo, texts, strict=True) if t]
            self.cache.put(done)
        for row in rows:
            audio = row.pop("cand_audio")
            starts = row.pop("cand_starts")
            row.pop("cand_windows")
            if row["status"] != OK:
                continue
            earlier = [(r["clip_start"], Reject(r["track_id"], r["stage"], r["reason"]))
                       for r in json.loads(str(row["clip_rejects"]))]  # fmt: skip
            sel = choose_captioned(
                str(row["track_id"]),
                [(float(s), captions[id(row), i]) for i, s in enumerate(starts)],
                vocal_words=self.words,
                earlier_rejects=earlier,
                failures={float(s): e for s, e in zip(starts, errors[id(row)], strict=True) if e},
            )
            if sel.track_reject is not None:
                _reject_row(row, sel.track_reject, sel.clip_rejects)
            else:
                kept = [float(s) for s in starts].index(sel.clip_start)
                row.update(audio=audio[kept], clip_start=sel.clip_start, caption=sel.caption)
                row["clip_rejects"] = _clip_rejects_json(sel.clip_rejects)
        return batch_of(rows)


class CodecEncoder:
    """Actor: DAC `encode` of the kept clip, all 9 codebooks as int16."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        p = ExperimentConfig.from_dict(cfg).preprocess
        self.model = load_codec(p.codec, device=device, setting="preprocess.codec")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        for row in rows:
            row["codes"] = np.zeros((0, 0), np.int16)
            if row["status"] != OK:
                continue
            try:
                row["codes"] = encode_codes(self.model, row["audio"])  # (9, F)
            except Exception as e:  # recorded, never raised (but for the machine's errors)
                if machine_error(e):
                    raise
                _reject_row(row, Reject(str(row["track_id"]), "codec", f"DAC encode failed: {e!r}"))
            row["audio"] = np.zeros(0, np.float32)  # the waveform is not needed downstream
        return batch_of(rows)


class CaptionEmbedder:
    """Actor: Flan-T5 encoder embeddings of the captions, fp16, with their lengths."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        p = ExperimentConfig.from_dict(cfg).preprocess
        self.encoder = TextEncoder(
            p.text_encoder, device=device, max_length=p.text_max_length, setting="preprocess.text_encoder"
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        ok = [r for r in rows if r["status"] == OK]
        for row in rows:
            row.update(text_emb=np.zeros((0, 0), np.float16), text_len=0)
        if ok:
            emb, lengths = self.encoder([str(r["caption"]) for r in ok])
            for row, e, n in zip(ok, emb, lengths, strict=True):
                row.update(text_emb=e[:n], text_len=int(n))
        return batch_of(rows)


def write_step(batch: dict[str, np.ndarray], *, tokens_dir: str, rejects_dir: str, split: SplitRule):
    """Write one batch's kept rows and rejections as Parquet parts; return a small status row per track.

    Both parts are named after the batch's track ids (`part_name`): Ray retries a task on the same block, so a
    retry after a write replaces that part (atomically) instead of adding a second copy of its rows.
    """
    rows = rows_of(batch)
    tokens, rejects = [], []
    for row in rows:
        track_id = str(row["track_id"])
        rejects += [dict(r) for r in json.loads(str(row["clip_rejects"]))]  # clip-level, clip_start set
        if row["status"] == OK:
            codes = np.asarray(row["codes"])
            tokens.append(
                dict(
                    track_id=track_id,
                    artist_id=str(row["artist_id"]),
                    clip_start=float(row["clip_start"]),
                    caption=str(row["caption"]),
                    codes=codes,
                    n_frames=codes.shape[1],
                    text_emb=np.asarray(row["text_emb"]),
                    text_len=int(row["text_len"]),
                    split=split(track_id, str(row["artist_id"])),
                )
            )
        else:
            rejects.append(dict(track_id=track_id, stage=str(row["stage"]), reason=str(row["reason"])))
    # Rejects first: a crash in between leaves the tracks unfinished (no token row, no track verdict),
    # so a rerun redoes them; a rerun never sees a track as done whose clip rejections are missing. Such a rerun
    # may batch those tracks differently and so write their clip rejections again under another name: readers
    # keep one row per key (tokens.REJECTS_KEY) and the summary counts the rest.
    name = part_name(str(r["track_id"]) for r in rows)
    write_part(rejects_table(rejects), rejects_dir, name=name)
    write_part(tokens_table(tokens), tokens_dir, name=name)
    return {
        "track_id": np.array([str(r["track_id"]) for r in rows]),
        "status": np.array([str(r["status"]) for r in rows]),
        "stage": np.array([str(r["stage"]) for r in rows]),
        **{key: np.array([int(r.get(key, 0)) for r in rows], dtype=np.int64) for key in AUDIO_STATS},
    }
