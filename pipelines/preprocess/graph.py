"""MTG-Jamendo -> token Parquet, as a Ray Data pipeline (paper section 3).

    metadata TSV (driver) -> decode + resample + 30 s clips, stereo kept (CPU tasks; they ship only the clip
      that selection tries first, see decode_step)
      -> clip selection: HTDemucs vocal removal on the stereo clip -> mono, silence rule, caption, vocal-cue
         filter (actor pool)
      [captions: model -> window captions (audio-language model) -> rephrased caption + vocal-cue filter
       (two actor pools; see pipelines/preprocess/captioning.py)]
      -> DAC encode of the kept clip (actor pool) -> Flan-T5 caption embedding (actor pool)
      -> Parquet parts: tokens/ and rejects/ (see pipelines/preprocess/tokens.py for the schema)

The steps themselves are in pipelines/preprocess/steps.py; this module wires them (resources, pool sizes), checks
the config, the models and the cluster before any data moves, and sums up what happened. Tracks that already have
an outcome on disk are skipped, so a rerun after a crash finishes the rest.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from configs.schema import DAC_N_CODEBOOKS, ConfigError, DataConfig, ExperimentConfig
from modeling.pretrained.codec import load_codec
from modeling.pretrained.separator import load_separator
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.files import atomic_write
from pipelines.paths import PATH_KEYS, PATH_OR_ID_KEYS, absolute_paths, inside, root_dir
from pipelines.preprocess.captioning import (
    caption_cache_dir,
    compact_cache,
)
from pipelines.preprocess.captions import build_captioner, resolve_local_model
from pipelines.preprocess.jamendo import Reject, audio_path, read_excluded_ids, read_metadata, read_split_ids
from pipelines.preprocess.steps import (
    DECODE_MEMORY,
    OK,
    CaptionEmbedder,
    CaptionRephraser,
    ClipSelector,
    CodecEncoder,
    WindowCaptioner,
    decode_step,
    write_step,
)
from pipelines.preprocess.tokens import (
    PART_GLOB,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    TOKENS_KEY,
    TOKENS_SCHEMA,
    SplitRule,
    finished_track_ids,
    part_name,
    read_unique,
    rejects_table,
    write_part,
)
from pipelines.runtime import ensure_ray

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
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong: printed last

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
        lines += [f"NOTE: {note}" for note in self.notes]
        return "\n".join(lines)


def _check_pretrained(cfg: ExperimentConfig) -> None:
    """Fail once, before any data is read, when a pretrained part is missing (names the setting)."""
    p = cfg.preprocess
    separator = load_separator(p.separator, setting="preprocess.separator")
    codec = load_codec(p.codec, setting="preprocess.codec")
    TextEncoder(p.text_encoder, setting="preprocess.text_encoder")
    rates = {"preprocess.sample_rate": p.sample_rate, "the separator's": separator.samplerate,
             "the codec's": int(codec.sample_rate)}  # fmt: skip
    if len(set(rates.values())) > 1:  # else every track is rejected at separation, or encoded at a wrong rate
        raise ConfigError(
            "the audio runs at one sample rate through separation and the codec, but "
            + ", ".join(f"{k} is {v} Hz" for k, v in rates.items())
            + ": set preprocess.sample_rate, or name models of that rate (preprocess.separator, preprocess.codec)"
        )
    if codec.n_codebooks != DAC_N_CODEBOOKS:
        raise ConfigError(
            f"preprocess.codec has {codec.n_codebooks} codebooks; the token table holds DAC 44.1 kHz's "
            f"{DAC_N_CODEBOOKS} (preprocess.codec=44khz)"
        )
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


def check_split(tokens_dir: str, rule: SplitRule) -> set[str]:
    """Refuse to add to a token table whose rows were split by other settings: the split is stored per row, and a
    rerun only writes the unfinished tracks, so the two rules would silently mix. Returns the table's track ids."""
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
    return set(on_disk.column("track_id").to_pylist())


# The settings a kept track's row (its clip, caption, codes, text features) or a track's verdict depends on. A rerun
# writes only the unfinished tracks, so these must not change under a token table (SETTINGS_FILE records them).
OUTPUT_SETTINGS = (
    "sample_rate", "clip_seconds", "seed", "separator", "max_silence_seconds", "silence_threshold_db", "captions",
    "caption_file", "caption_audio_model", "caption_text_model", "caption_windows", "caption_window_seconds",
    "caption_max_new_tokens", "caption_candidates", "vocal_words", "codec", "text_encoder", "text_max_length",
)  # fmt: skip
SETTINGS_FILE = "_preprocess_settings.json"  # in both output folders; readers take only part-*.parquet
# The ones that may name a file. Recorded as absolute paths with the project root they resolved against (ROOT_KEY):
# a file counts as the same when its absolute path is, or when both lie at the same place inside their root (the
# project moved whole, its models inside).
_PATH_SETTINGS = {f"preprocess.{k}" for k in (*PATH_KEYS["preprocess"], *PATH_OR_ID_KEYS["preprocess"])}
ROOT_KEY = "project_root"


def _moved_alike(recorded: dict, wanted: dict, root: Path) -> dict:
    """`recorded` with each path setting that lies at the same place inside its root as in `wanted` taken as
    `wanted`'s (a record without its root, an earlier version's, is compared as it is)."""
    old_root = recorded.pop(ROOT_KEY, None)
    same = {
        k: wanted[k]
        for k in _PATH_SETTINGS & recorded.keys() & wanted.keys()
        if old_root and isinstance(recorded[k], str) and isinstance(wanted[k], str)
        and (place := inside(recorded[k], old_root)) is not None and place == inside(wanted[k], root)
    }  # fmt: skip
    return {**recorded, **same}


def check_settings(cfg: ExperimentConfig) -> None:
    """Refuse to add to a token table or its rejects made with other OUTPUT_SETTINGS, naming them; record them
    for new output (or output an earlier version wrote, which did not record them). The record is kept in both
    folders, so deleting one of them (to redo the kept tracks, say) keeps it. A record of a run that wrote nothing
    (it stopped before its first part) is simply replaced."""
    from configs import changes

    p = cfg.preprocess
    wanted = {f"preprocess.{k}": getattr(p, k) for k in OUTPUT_SETTINGS}
    root = root_dir()
    folders = [Path(cfg.data.tokens_dir), Path(p.rejects_dir)]
    written = any(next(d.glob(PART_GLOB), None) is not None for d in folders)
    records = [d / SETTINGS_FILE for d in folders if (d / SETTINGS_FILE).is_file()]
    if written and records:
        changed = changes(_moved_alike(json.loads(records[0].read_text()), wanted, root), wanted)
        if changed:
            raise ConfigError(
                f"the output in {cfg.data.tokens_dir} and {p.rejects_dir} was made with other settings; a rerun only "
                "adds the unfinished tracks, which would be made differently:\n  "
                + "\n  ".join(changed)
                + "\nrestore them, or delete both folders to redo every track with these (or delete "
                + " and ".join(map(str, records))
                + " to accept the mix)"
            )
    record = json.dumps({**wanted, ROOT_KEY: str(root)}, indent=1) + "\n"
    for d in folders:
        atomic_write(d / SETTINGS_FILE, lambda tmp: tmp.write_text(record))


def check_exclusion(tokens_dir: str, kept: set[str], excluded: set[str]) -> None:
    """Refuse to add to a token table (its track ids: `kept`) that holds tracks the exclusion list names: an earlier
    run without it kept them, and a rerun skips finished tracks, so they would stay in training (the eval set's
    tracks, leaked)."""
    leaked = sorted(excluded & kept)
    if leaked:
        raise ConfigError(
            f"{len(leaked)} track(s) of preprocess.exclude_csv have token rows in {tokens_dir} (e.g. "
            f"{', '.join(leaked[:3])}), written by a run without that exclusion: delete {tokens_dir} and the "
            "rejects folder (preprocess.rejects_dir) and run again"
        )


def unlisted_rows_note(tokens_dir: str, kept: set[str], listed: set[str]) -> str | None:
    """A note when the token table (its track ids: `kept`) holds rows of tracks the metadata TSV does not list
    (`listed`): an earlier corpus's, or another shard's of the same dataset. Training reads them all."""
    unlisted = sorted(kept - listed)
    if not unlisted:
        return None
    return (
        f"{len(unlisted)} token row(s) in {tokens_dir} are of tracks not in preprocess.metadata_tsv (e.g. "
        f"{', '.join(unlisted[:3])}): another shard's or an earlier corpus's; training reads every row of "
        "data.tokens_dir"
    )


def run_preprocess(
    cfg: ExperimentConfig, *, check_pretrained: bool = True, address: str | None = None
) -> PreprocessSummary:
    """Run the whole pipeline on the current Ray cluster, else on the one at `address` (or RAY_ADDRESS), else on a
    local one. The config, the files and the models are checked first: a mistake in them never starts Ray."""
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
    kept = check_split(tokens_dir, split)
    check_settings(cfg)

    tracks, rejects = read_metadata(p.metadata_tsv)
    summary = PreprocessSummary(tracks_in_metadata=len(tracks) + len(rejects))
    if note := unlisted_rows_note(tokens_dir, kept, {t.track_id for t in (*tracks, *rejects)}):
        summary.notes.append(note)
    if p.exclude_csv:
        try:
            excluded = read_excluded_ids(p.exclude_csv)
        except ValueError as e:
            raise ConfigError(f"preprocess.exclude_csv: {e}") from None
        check_exclusion(tokens_dir, kept, excluded)
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
        ensure_ray(address)
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
