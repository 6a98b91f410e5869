"""MTG-Jamendo -> token Parquet, as a Ray Data pipeline (paper section 3).

    metadata TSV (driver) -> decode + resample + 30 s clips, stereo kept (CPU tasks; they ship only the clip
      that selection tries first, see decode_step)
      -> clip selection: HTDemucs vocal removal on the stereo clip -> mono, silence rule, caption, vocal-cue
         filter (actor pool)
      [captions: model -> window captions (audio-language model) -> rephrased caption + vocal-cue filter
       (two actor pools; see pipelines/preprocess/captioning.py)]
      -> DAC encode of the kept clip (actor pool) -> Flan-T5 caption embedding (actor pool)
      -> Parquet parts: tokens/ and rejects/ (see pipelines/preprocess/tokens.py for the schema)

Every row carries a status; rejections travel with the data instead of raising, so one bad file never
stops the job and nothing is dropped silently. Tracks that already have an outcome on disk are skipped,
so a rerun after a crash finishes the rest.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from configs.schema import ConfigError, DataConfig, ExperimentConfig
from modeling.pretrained.codec import encode_codes, load_codec
from modeling.pretrained.separator import load_separator, remove_vocals
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.paths import absolute_paths
from pipelines.preprocess.audio import TrackClips, clip_order, decode_track
from pipelines.preprocess.captioning import (
    AudioCaptioner,
    CaptionCache,
    Rephraser,
    caption_cache_dir,
    caption_key,
    compact_cache,
    split_windows,
)
from pipelines.preprocess.captions import build_captioner, resolve_local_model
from pipelines.preprocess.filters import DEFAULT_VOCAL_WORDS
from pipelines.preprocess.jamendo import Reject, Track, audio_path, read_excluded_ids, read_metadata, read_split_ids
from pipelines.preprocess.selection import choose_captioned, select_clip
from pipelines.preprocess.tokens import (
    REJECTS_KEY,
    REJECTS_SCHEMA,
    TOKENS_KEY,
    TOKENS_SCHEMA,
    SplitRule,
    finished_track_ids,
    part_name,
    read_unique,
    rejects_table,
    tokens_table,
    write_part,
)
from pipelines.runtime import ensure_ray

OK = "ok"
REJECTED = "rejected"
DECODE_MEMORY = 512 * 2**20  # bytes a decode task reserves (a scheduling hint; Ray does not enforce it)


# --- per-row steps (plain functions and callable classes, testable without Ray) ---------------------------


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


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
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
        for row in _rows(batch):
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
        return _batch(out)


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
        rows, p = _rows(batch), self.p
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
        return _batch(rows)


class CaptionRephraser(_CaptionStep):
    """Actor, stage 2 of `captions: model`: rephrase each candidate's window captions into one caption (Rephraser),
    unless the cache has it; then keep the first candidate whose caption passes the vocal-cue rule (its audio,
    start and caption become the row's) and record the others as clip rejects."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        super().__init__(cfg, device)
        p = self.p
        self.words = tuple(p.vocal_words) if p.vocal_words is not None else DEFAULT_VOCAL_WORDS

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, p = _rows(batch), self.p
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
        return _batch(rows)


class CodecEncoder:
    """Actor: DAC `encode` of the kept clip, all 9 codebooks as int16."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        p = ExperimentConfig.from_dict(cfg).preprocess
        self.model = load_codec(p.codec, device=device, setting="preprocess.codec")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        for row in rows:
            row["codes"] = np.zeros((0, 0), np.int16)
            if row["status"] != OK:
                continue
            try:
                row["codes"] = encode_codes(self.model, row["audio"])  # (9, F)
            except Exception as e:  # recorded, never raised
                _reject_row(row, Reject(str(row["track_id"]), "codec", f"DAC encode failed: {e!r}"))
            row["audio"] = np.zeros(0, np.float32)  # the waveform is not needed downstream
        return _batch(rows)


class CaptionEmbedder:
    """Actor: Flan-T5 encoder embeddings of the captions, fp16, with their lengths."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        p = ExperimentConfig.from_dict(cfg).preprocess
        self.encoder = TextEncoder(
            p.text_encoder, device=device, max_length=p.text_max_length, setting="preprocess.text_encoder"
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        ok = [r for r in rows if r["status"] == OK]
        for row in rows:
            row.update(text_emb=np.zeros((0, 0), np.float16), text_len=0)
        if ok:
            emb, lengths = self.encoder([str(r["caption"]) for r in ok])
            for row, e, n in zip(ok, emb, lengths, strict=True):
                row.update(text_emb=e[:n], text_len=int(n))
        return _batch(rows)


def write_step(batch: dict[str, np.ndarray], *, tokens_dir: str, rejects_dir: str, split: SplitRule):
    """Write one batch's kept rows and rejections as Parquet parts; return a small status row per track.

    Both parts are named after the batch's track ids (`part_name`): Ray retries a task on the same block, so a
    retry after a write replaces that part (atomically) instead of adding a second copy of its rows.
    """
    rows = _rows(batch)
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


# --- the job ------------------------------------------------------------------------------------------------


@dataclass
class PreprocessSummary:
    tracks_in_metadata: int = 0
    skipped_done: int = 0  # already finished by an earlier run
    processed: int = 0
    kept: int = 0
    rejected_tracks: dict[str, int] = field(default_factory=dict)  # this run, by stage
    totals: dict[str, int] = field(default_factory=dict)  # on disk after this run, one row per key
    seconds: float = 0.0
    # Audio that crossed the object store between stages this run (the sums of AUDIO_STATS over the tracks):
    audio_bytes_decode: int = 0  # decode tasks -> clip selection (the clips shipped for selection to try)
    audio_bytes_select: int = 0  # clip selection -> DAC encoder (the kept clips, mono float32)
    audio_mb_per_kept_clip: float = 0.0  # (decode + select) / kept, in MB (1e6 bytes); 0 when none was kept
    selector_decodes: int = 0  # tracks whose first clip was rejected, so selection decoded the track again

    def table(self) -> str:
        lines = [
            f"tracks in metadata      {self.tracks_in_metadata}",
            f"already done (skipped)  {self.skipped_done}",
            f"processed this run      {self.processed}",
            f"kept (one clip each)    {self.kept}",
        ]
        lines += [f"rejected at {stage:<12} {n}" for stage, n in sorted(self.rejected_tracks.items())]
        lines += ["on disk:"] + [f"  {k:<21} {v}" for k, v in self.totals.items()]
        lines.append(
            f"audio moved per kept clip {self.audio_mb_per_kept_clip:.1f} MB  (decode -> selection "
            f"{self.audio_bytes_decode / 1e6:.1f} MB + selection -> codec {self.audio_bytes_select / 1e6:.1f} MB)"
        )
        lines.append(f"tracks decoded again    {self.selector_decodes}  (by selection: first clip rejected)")
        lines.append(f"wall time               {self.seconds:.1f} s")
        return "\n".join(lines)


def _check_pretrained(cfg: ExperimentConfig) -> None:
    """Fail once, before any data is read, when a pretrained part is missing (names the setting)."""
    p = cfg.preprocess
    load_separator(p.separator, setting="preprocess.separator")
    load_codec(p.codec, setting="preprocess.codec")
    TextEncoder(p.text_encoder, setting="preprocess.text_encoder")
    if p.captions == "model":  # found, not loaded: the caption actors load them when a clip misses the cache
        resolve_local_model(p.caption_audio_model, "preprocess.caption_audio_model")
        resolve_local_model(p.caption_text_model, "preprocess.caption_text_model")


def check_cluster(
    gpus_per_actor: float, actors: dict[str, int], cpus_per_actor: dict[str, float] | None = None
) -> None:
    """Refuse a Ray cluster that cannot hold the model actor pools (`actors`: preprocess.<key> -> pool size) with
    one CPU each (or `cpus_per_actor[key]`), plus one CPU for the decode tasks, or that has no GPU when the actors
    ask for one."""
    if gpus_per_actor > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_actor:
        raise ConfigError(
            f"preprocess.gpus_per_actor={gpus_per_actor:g} but the Ray cluster has no GPU; "
            "set preprocess.gpus_per_actor=0 to run the model steps on CPUs"
        )
    shares = cpus_per_actor or {}
    n = sum(count * shares.get(key, 1.0) for key, count in actors.items())
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < n + 1:
        raise ConfigError(
            f"the Ray cluster has {cpus:g} CPUs; the model actors (preprocess.{' + '.join(actors)}) hold {n:g} "
            "and decoding needs one more: lower the actor counts (or preprocess.caption_cpus_per_actor) or give Ray "
            "more CPUs (ray start --num-cpus)"
        )


def split_rule(data: DataConfig) -> SplitRule:
    """The train/val rule of `data` (data.split); reads data.split_file for `file` (a ConfigError when missing)."""
    val_ids: frozenset[str] = frozenset()
    if data.split == "file":
        if not data.split_file or not Path(data.split_file).is_file():
            raise ConfigError(f"data.split is 'file' but data.split_file {data.split_file} does not exist")
        try:
            val_ids = frozenset(read_split_ids(data.split_file))
        except ValueError as e:
            raise ConfigError(f"data.split_file: {e}") from None
    return SplitRule(data.split, data.val_fraction, data.seed, val_ids)


def check_split(tokens_dir: str, rule: SplitRule) -> None:
    """Refuse to add to a token table whose rows were split by other settings: the split is stored per row, and a
    rerun only writes the unfinished tracks, so the two rules would silently mix."""
    on_disk, _ = read_unique(tokens_dir, TOKENS_KEY, TOKENS_SCHEMA, ["track_id", "artist_id", "split"])
    moved = [
        (t, s)
        for t, a, s in zip(*(on_disk.column(c).to_pylist() for c in ("track_id", "artist_id", "split")), strict=True)
        if rule(t, a) != s
    ]
    if moved:
        track, stored = moved[0]
        raise ConfigError(
            f"{len(moved)} of the {on_disk.num_rows} token rows in {tokens_dir} were split by other settings "
            f"({track} is in {stored!r}): data.split, data.split_file, data.val_fraction or data.seed changed since "
            f"they were written; restore them, or delete {tokens_dir} to redo the kept tracks (rejects stay valid)"
        )


def run_preprocess(cfg: ExperimentConfig, *, check_pretrained: bool = True) -> PreprocessSummary:
    """Run the whole pipeline on the current Ray cluster (starting a local one when none is connected)."""
    t0 = time.time()
    cfg = absolute_paths(cfg)
    p = cfg.preprocess
    if check_pretrained:
        _check_pretrained(cfg)
    if p.captions == "file" and not Path(p.caption_file).is_file():
        raise ConfigError(f"preprocess.caption_file {p.caption_file} does not exist")
    if p.captions == "file":  # read once here, so a malformed file stops the job before Ray starts
        try:
            build_captioner("file", path=p.caption_file)
        except ValueError as e:
            raise ConfigError(f"preprocess.caption_file: {e}") from None
    tokens_dir, rejects_dir = cfg.data.tokens_dir, p.rejects_dir
    split = split_rule(cfg.data)
    check_split(tokens_dir, split)

    tracks, rejects = read_metadata(p.metadata_tsv)
    summary = PreprocessSummary(tracks_in_metadata=len(tracks) + len(rejects))
    if p.exclude_csv:
        excluded = read_excluded_ids(p.exclude_csv)
        kept_tracks = []
        for t in tracks:
            if t.track_id in excluded:
                rejects.append(Reject(t.track_id, "exclusion", "listed in the Song Describer Dataset"))
            else:
                kept_tracks.append(t)
        tracks = kept_tracks

    done = finished_track_ids(tokens_dir, rejects_dir)
    new_rejects = [r for r in rejects if r.track_id not in done]
    todo = [t for t in tracks if t.track_id not in done]
    summary.skipped_done = len(tracks) + len(rejects) - len(todo) - len(new_rejects)
    # Named after its tracks, like a batch's part: writing the same verdicts again replaces them.
    name = part_name(r.track_id for r in new_rejects)
    write_part(rejects_table([asdict(r) for r in new_rejects]), rejects_dir, name=name)
    statuses = [("rejected", r.stage) for r in new_rejects]

    if todo:
        ensure_ray()
        gpus = p.gpus_per_actor
        actors = dict(separator_actors=p.separator_actors, codec_actors=p.codec_actors, text_actors=p.text_actors)
        caption_cpus = {}
        if p.captions == "model":
            compact_cache(caption_cache_dir(cfg))
            actors.update(caption_audio_actors=p.caption_audio_actors, caption_text_actors=p.caption_text_actors)
            caption_cpus = dict.fromkeys(("caption_audio_actors", "caption_text_actors"), p.caption_cpus_per_actor)
        check_cluster(gpus, actors, caption_cpus)
        device = "cuda" if gpus > 0 else "cpu"
        items = [
            dict(
                track_id=t.track_id,
                artist_id=t.artist_id,
                path=str(audio_path(p.audio_root, t)),
                track_json=json.dumps(asdict(t)),
            )
            for t in todo
        ]
        cfg_dict = cfg.to_dict()
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
        # Decode/resample/clip are plain CPU tasks. Their memory hint (a whole decoded track, stereo float32, and
        # its resampled copy: a few hundred MB for a long one) also keeps Ray Data from fusing them into the
        # separator actors (it fuses steps with equal remote args), so decoding scales with the CPUs of the
        # cluster instead of with preprocess.separator_actors.
        ds = ds.map(
            decode_step,
            fn_kwargs=dict(sample_rate=p.sample_rate, clip_seconds=p.clip_seconds, seed=p.seed),
            num_cpus=1,
            memory=DECODE_MEMORY,
        )
        model_step = dict(num_gpus=gpus, fn_constructor_kwargs=dict(cfg=cfg_dict, device=device))
        # One track per call: a track's clips are visited sequentially and most stop at the first clip.
        ds = ds.map_batches(
            ClipSelector, compute=ray.data.ActorPoolStrategy(size=p.separator_actors), batch_size=1, **model_step
        )
        model_step["batch_size"] = p.batch_size
        if p.captions == "model":  # after separation + silence: only surviving clips are captioned
            for step, size in ((WindowCaptioner, p.caption_audio_actors), (CaptionRephraser, p.caption_text_actors)):
                pool = ray.data.ActorPoolStrategy(size=size)
                ds = ds.map_batches(step, compute=pool, num_cpus=p.caption_cpus_per_actor, **model_step)
        ds = ds.map_batches(CodecEncoder, compute=ray.data.ActorPoolStrategy(size=p.codec_actors), **model_step)
        ds = ds.map_batches(CaptionEmbedder, compute=ray.data.ActorPoolStrategy(size=p.text_actors), **model_step)
        ds = ds.map_batches(
            write_step,
            batch_size=p.batch_size,
            fn_kwargs=dict(tokens_dir=tokens_dir, rejects_dir=rejects_dir, split=split),
        )
        for r in ds.take_all():
            statuses.append((r["status"], r["stage"]))
            summary.audio_bytes_decode += int(r["decode_bytes"])
            summary.audio_bytes_select += int(r["select_bytes"])
            summary.selector_decodes += int(r["selector_decodes"])

    summary.processed = len(todo)
    summary.kept = sum(1 for status, _ in statuses if status == OK)
    summary.rejected_tracks = dict(Counter(stage for status, stage in statuses if status != OK))
    if summary.kept:
        summary.audio_mb_per_kept_clip = (summary.audio_bytes_decode + summary.audio_bytes_select) / summary.kept / 1e6
    summary.totals = on_disk_totals(tokens_dir, rejects_dir)
    summary.seconds = time.time() - t0
    return summary


def on_disk_totals(tokens_dir: str, rejects_dir: str) -> dict[str, int]:
    """Rows on disk, one per key (tokens: track; rejects: track, clip, stage), and the duplicates left out."""
    tokens, token_duplicates = read_unique(tokens_dir, TOKENS_KEY, TOKENS_SCHEMA, ["track_id", "split"])
    rejects, reject_duplicates = read_unique(
        rejects_dir, REJECTS_KEY, REJECTS_SCHEMA, ["track_id", "stage", "clip_start"]
    )
    splits = Counter(tokens.column("split").to_pylist())
    totals = {"token rows": tokens.num_rows, "train": splits.get("train", 0), "val": splits.get("val", 0)}
    track_level = Counter(
        s
        for s, c in zip(rejects.column("stage").to_pylist(), rejects.column("clip_start").to_pylist(), strict=True)
        if c is None
    )
    totals["rejected tracks"] = sum(track_level.values())
    totals.update({f"  {stage}": n for stage, n in sorted(track_level.items())})
    totals["rejected clips"] = rejects.num_rows - totals["rejected tracks"]
    totals["duplicates ignored"] = token_duplicates + reject_duplicates
    return totals
