"""A caption CSV + audio -> the eval set (pipelines/preprocess/evalset.py), as a Ray Data pipeline.

    CSV (driver: header and per-row checks, captions grouped by audio file)
      -> decode + resample to 44.1 kHz mono + cut `eval.seconds` at `eval.reference_offset`, once per file (CPU tasks)
      -> DAC encode of the 16-bit reference (actor pool)  -> one row per caption
      -> Flan-T5 caption embedding (actor pool) -> Parquet parts in a temporary folder beside eval.set_dir
      -> checked (every kept caption exactly once) and renamed into place, with rejects.csv

The CSV is the Song Describer Dataset's (`caption_id, track_id, caption, is_valid_subset, familiarity, artist_id,
album_id, path, duration`); only caption_id, track_id, caption and path are read, so any CSV with those columns
works (e.g. MusicCaps with its clips cut to files). `path` is relative to eval.set_audio_root. The model actors
and their settings are preprocessing's (graph.py: preprocess.codec, text_encoder, codec_actors, text_actors,
gpus_per_actor, batch_size), so the set's codes and embeddings are made exactly as the training tokens are.

Nothing vanishes silently: a CSV without the needed columns is refused before Ray starts; a row with an empty
caption or a repeated caption_id, or whose audio is missing, undecodable or shorter than offset + seconds, is
a reject (stage `csv`, `decode`, `clip` or `codec`) that the summary counts and lists and rejects.csv keeps.
The set is exactly-once: parts are named by the captions they hold (a retried writer replaces its own part),
the driver checks that every kept caption is on disk once, and the folder replaces eval.set_dir in one rename.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from configs.schema import ConfigError, ExperimentConfig
from modeling.pretrained.codec import load_codec
from modeling.pretrained.text_encoder import TextEncoder
from pipelines.paths import absolute_paths
from pipelines.preprocess.audio import AudioError, load_audio, resample
from pipelines.preprocess.evalset import EVALSET_SCHEMA, PCM_SCALE, evalset_table, to_pcm16
from pipelines.preprocess.graph import check_cluster
from pipelines.preprocess.steps import DECODE_MEMORY, OK, REJECTED, CaptionEmbedder, CodecEncoder, rows_of
from pipelines.preprocess.tokens import PART_GLOB, read_parts, write_part
from pipelines.runtime import ensure_ray

REQUIRED_COLUMNS = ("caption_id", "track_id", "caption", "path")
REJECTS_NAME = "rejects.csv"
REJECT_FIELDS = ("index", "line", "caption_id", "track_id", "caption", "path", "stage", "reason")
SHOWN_REJECTS = 20  # the summary lists this many; rejects.csv has them all


# --- the CSV (driver side, before Ray) ------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRow:
    """One CSV row: `index` is its row number (0 = the first row after the header), `line` its line in the file."""

    index: int
    line: int
    caption_id: str
    track_id: str
    caption: str
    path: str  # as written in the CSV, relative to eval.set_audio_root


@dataclass
class EvalsetCSV:
    """The captions that go to the pipeline, and the rows refused on reading (`stage` "csv")."""

    rows: list[CaptionRow]
    rejects: list[dict]
    n_rows: int


def _reject(row: CaptionRow, stage: str, reason: str) -> dict:
    return dict(asdict(row), stage=stage, reason=reason)


def read_evalset_csv(csv_path: str | Path) -> EvalsetCSV:
    """Read a Song Describer-layout CSV.

    Rows with an empty caption_id, track_id, caption or path, and every repeat of a caption_id after its first
    row, are rejected (not returned). Captions are kept as written; ids and paths lose surrounding spaces.

    Raises:
        FileNotFoundError when the file does not exist.
        ConfigError naming the missing columns and the ones found, when the header lacks one of REQUIRED_COLUMNS.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"eval.set_csv {csv_path} does not exist")
    with csv_path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(
                f"eval.set_csv {csv_path} has no {', '.join(missing)} column{'s' * (len(missing) > 1)} "
                f"(it has: {', '.join(columns) or 'no header'}); the eval set needs {', '.join(REQUIRED_COLUMNS)} "
                "(the Song Describer Dataset layout, `path` relative to eval.set_audio_root)"
            )
        reader.fieldnames = columns
        rows, rejects, first_line, n_rows = [], [], {}, 0
        for index, raw in enumerate(reader):
            n_rows = index + 1
            value = {c: raw.get(c) or "" for c in REQUIRED_COLUMNS}  # a short row's missing fields are None
            row = CaptionRow(
                index=index,
                line=reader.line_num,
                caption_id=value["caption_id"].strip(),
                track_id=value["track_id"].strip(),
                caption=value["caption"],
                path=value["path"].strip(),
            )
            empty = [c for c in REQUIRED_COLUMNS if not getattr(row, c).strip()]
            first = first_line.setdefault(row.caption_id, row.line)
            if empty:
                rejects.append(_reject(row, "csv", f"empty {' and '.join(empty)}"))
            elif first != row.line:
                rejects.append(_reject(row, "csv", f"duplicate caption_id {row.caption_id} (first on line {first})"))
            else:
                rows.append(row)
    return EvalsetCSV(rows, rejects, n_rows)


# --- per-row steps (plain functions, testable without Ray) ------------------------------------------------------


def decode_reference(row: dict, *, sample_rate: int, offset: float, seconds: float) -> dict:
    """Decode one audio file, downmix, resample and cut its reference: `seconds` from `offset` seconds in.

    Adds `pcm` (T,) int16, the reference as a 16-bit WAV file would hold it, and `audio` (T,) float32, the same
    samples as floats (what the codec encodes, so the codes are exactly the stored reference's). A file that is
    missing, undecodable or too short becomes a reject (stage "decode" or "clip"); this never raises for audio.
    """
    row.update(
        status=OK, stage="", reason="", clip_rejects="[]", audio=np.zeros(0, np.float32), pcm=np.zeros(0, np.int16)
    )
    start, length = int(round(offset * sample_rate)), int(round(seconds * sample_rate))
    try:
        x, sr = load_audio(row["file"])
        x = resample(x, sr, sample_rate)
    except (AudioError, ValueError) as e:  # soxr refuses some inputs (absurd sample rates) with ValueError
        row.update(status=REJECTED, stage="decode", reason=str(e))
        return row
    if len(x) < start + length:
        row.update(
            status=REJECTED,
            stage="clip",
            reason=f"the audio is {len(x) / sample_rate:.2f} s long, shorter "
            f"than eval.reference_offset + eval.seconds = {offset:g} + {seconds:g} s",
        )
        return row
    row["pcm"] = to_pcm16(x[start : start + length])
    row["audio"] = (row["pcm"] / np.float32(PCM_SCALE)).astype(np.float32)  # as read_evalset reads it back
    return row


def caption_rows(row: dict) -> list[dict]:
    """One audio file's row (after the codec) -> one row per caption of that file, sharing its reference."""
    shared = {k: row[k] for k in ("status", "stage", "reason", "pcm", "codes")}
    return [dict(c, **shared) for c in json.loads(str(row["captions_json"]))]


def write_step(batch: dict[str, np.ndarray], *, out_dir: str, run_id: str, sample_rate: int) -> dict[str, np.ndarray]:
    """Write a batch's kept captions as one part; return every caption's outcome (no arrays).

    The part's name comes from this run and the captions in it, so a retried task replaces its part.
    """
    rows = rows_of(batch)
    kept = [r for r in rows if r["status"] == OK]
    if kept:
        indices = sorted(int(r["index"]) for r in kept)
        digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]
        table = evalset_table(
            [
                dict(
                    index=int(r["index"]),
                    caption_id=str(r["caption_id"]),
                    track_id=str(r["track_id"]),
                    caption=str(r["caption"]),
                    text_emb=np.asarray(r["text_emb"]),
                    audio=np.asarray(r["pcm"], np.float64) / PCM_SCALE,  # back to the same int16 when stored
                    sample_rate=sample_rate,
                    codes=np.asarray(r["codes"]),
                )
                for r in kept
            ]
        )
        write_part(table, out_dir, name=f"part-{run_id}-{indices[0]:06d}-{digest}.parquet")
    return {k: np.array([str(r[k]) for r in rows]) for k in ("index", "status", "stage", "reason")}


# --- the job ---------------------------------------------------------------------------------------------------


@dataclass
class EvalsetSummary:
    csv_rows: int = 0
    audio_files: int = 0  # distinct files of the rows that passed the CSV checks
    kept: int = 0  # captions in the written set
    rejected: dict[str, int] = field(default_factory=dict)  # by stage
    rejects: list[dict] = field(default_factory=list)  # REJECT_FIELDS, by CSV row
    set_dir: str = ""
    written: bool = False  # False: nothing was kept, and any earlier set is left as it was
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"captions in CSV         {self.csv_rows}",
            f"audio files             {self.audio_files}",
            f"kept (rows in the set)  {self.kept}",
            f"rejected                {sum(self.rejected.values())}",
        ]
        lines += [f"  {stage:<21} {n}" for stage, n in sorted(self.rejected.items())]
        lines.append(f"wall time               {self.seconds:.1f} s")
        if self.rejects:
            where = f" (all in {Path(self.set_dir) / REJECTS_NAME})" if self.written else ""
            lines.append(f"rejected captions{where}:")
            for r in self.rejects[:SHOWN_REJECTS]:
                lines.append(
                    f"  line {r['line']} caption_id {r['caption_id']} ({r['path']}): {r['stage']}: {r['reason']}"
                )
            if len(self.rejects) > SHOWN_REJECTS:
                lines.append(f"  ... and {len(self.rejects) - SHOWN_REJECTS} more")
        return "\n".join(lines)


def check_set_dir(set_dir: str | Path) -> None:
    """Refuse an eval.set_dir that a rerun must not replace: a file, or a folder holding more than an eval set."""
    set_dir = Path(set_dir)
    if set_dir.exists() and not set_dir.is_dir():
        raise ConfigError(f"eval.set_dir {set_dir} is a file, not a folder")
    if set_dir.is_dir():
        other = [
            p.name
            for p in set_dir.iterdir()
            if not (p.match(PART_GLOB) or p.name == REJECTS_NAME or p.name.startswith("."))
        ]
        if other:
            raise ConfigError(
                f"eval.set_dir {set_dir} holds files that are not part of an eval set ({', '.join(sorted(other)[:5])}"
                "), and make-evalset replaces the whole folder: point eval.set_dir at a folder of its own"
            )


def _check_pretrained(cfg: ExperimentConfig) -> None:
    """Fail once, before Ray starts, when the codec or the text encoder is missing (names the setting)."""
    p = cfg.preprocess
    load_codec(p.codec, setting="preprocess.codec")
    TextEncoder(p.text_encoder, setting="preprocess.text_encoder")


def run_make_evalset(
    cfg: ExperimentConfig, *, address: str | None = None, check_pretrained: bool = True, progress: bool = True
) -> EvalsetSummary:
    """Write the eval set of `cfg.eval` (see the module docstring) and return its summary.

    Everything that can be checked without Ray is checked first: the CSV, eval.set_audio_root, eval.set_dir and
    the pretrained weights. Then Ray starts (`address`, else RAY_ADDRESS, else a local one) unless connected.
    """
    t0 = time.time()
    cfg = absolute_paths(cfg)
    e = cfg.eval
    table = read_evalset_csv(e.set_csv)
    if not Path(e.set_audio_root).is_dir():
        raise FileNotFoundError(f"eval.set_audio_root {e.set_audio_root} is not a folder")
    set_dir = Path(e.set_dir)
    check_set_dir(set_dir)
    if check_pretrained:
        _check_pretrained(cfg)

    by_file: dict[str, list[CaptionRow]] = defaultdict(list)
    for row in table.rows:
        by_file[str(Path(e.set_audio_root) / row.path)].append(row)
    summary = EvalsetSummary(csv_rows=table.n_rows, audio_files=len(by_file), set_dir=str(set_dir))
    statuses: list[dict] = []
    run_id = uuid.uuid4().hex[:12]
    tmp = set_dir.parent / f".{set_dir.name}.tmp-{run_id}"  # beside set_dir: one filesystem, so a rename moves it
    try:
        if by_file:
            ensure_ray(address)
            statuses = _run_pipeline(cfg, by_file, str(tmp), run_id, progress=progress)
        rows = {r.index: r for r in table.rows}
        failed = [s for s in statuses if s["status"] != OK]
        summary.rejects = sorted(
            table.rejects + [_reject(rows[int(s["index"])], s["stage"], s["reason"]) for s in failed],
            key=lambda r: r["index"],
        )
        summary.rejected = dict(Counter(r["stage"] for r in summary.rejects))
        kept = sorted(int(s["index"]) for s in statuses if s["status"] == OK)
        summary.kept = len(kept)
        if kept:
            on_disk = sorted(read_parts(tmp, ["index"], EVALSET_SCHEMA).column("index").to_pylist())
            if on_disk != kept:  # e.g. a task retried with another batch: never publish a set with repeats or holes
                raise RuntimeError(
                    f"eval set parts in {tmp} hold {len(on_disk)} rows ({len(set(on_disk))} distinct) where "
                    f"{len(kept)} captions were kept; {set_dir} was left as it was, run make-evalset again"
                )
            _write_rejects(summary.rejects, tmp / REJECTS_NAME)
            _replace_dir(tmp, set_dir)
            summary.written = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left only by a failure
    summary.seconds = time.time() - t0
    return summary


def _run_pipeline(
    cfg: ExperimentConfig, by_file: dict[str, list[CaptionRow]], out_dir: str, run_id: str, *, progress: bool
) -> list[dict]:
    """The Ray Data part: one item per audio file in, one outcome per caption out (in completion order)."""
    e, p = cfg.eval, cfg.preprocess
    gpus = p.gpus_per_actor
    check_cluster(gpus, dict(codec_actors=p.codec_actors, text_actors=p.text_actors))
    items = [
        dict(file=file, track_id=captions[0].track_id, captions_json=json.dumps([asdict(c) for c in captions]))
        for file, captions in by_file.items()
    ]
    model_step = dict(
        num_gpus=gpus,
        fn_constructor_kwargs=dict(cfg=cfg.to_dict(), device="cuda" if gpus > 0 else "cpu"),
        batch_size=p.batch_size,
    )
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    # As in preprocessing: plain CPU tasks, with their own memory hint so that Ray Data does not fuse them into
    # the codec actors (decoding then scales with the cluster's CPUs, not with preprocess.codec_actors).
    ds = ds.map(
        decode_reference,
        fn_kwargs=dict(sample_rate=p.sample_rate, offset=e.reference_offset, seconds=e.seconds),
        num_cpus=1,
        memory=DECODE_MEMORY,
    )
    # CodecEncoder encodes `audio` and empties it; the reference travels on as `pcm`.
    ds = ds.map_batches(CodecEncoder, compute=ray.data.ActorPoolStrategy(size=p.codec_actors), **model_step)
    ds = ds.flat_map(caption_rows)
    ds = ds.map_batches(CaptionEmbedder, compute=ray.data.ActorPoolStrategy(size=p.text_actors), **model_step)
    ds = ds.map_batches(
        write_step, batch_size=p.batch_size, fn_kwargs=dict(out_dir=out_dir, run_id=run_id, sample_rate=p.sample_rate)
    )
    total = sum(len(c) for c in by_file.values())
    statuses, last = [], time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        statuses += rows_of(batch)
        if progress and (time.time() - last > 10 or len(statuses) == total):
            last = time.time()
            ok = sum(1 for s in statuses if s["status"] == OK)
            print(f"make-evalset: {len(statuses)}/{total} captions done ({ok} kept)", file=sys.stderr, flush=True)
    return [{k: str(v) for k, v in s.items()} for s in statuses]


def _write_rejects(rejects: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, REJECT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rejects)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final`, replacing what is there: readers see the old set or the new one, never a mix.

    Where the swap is not available (not Linux, some network filesystems) the old folder is moved aside first,
    so for an instant `final` is absent (a reader gets "no eval set", never half of one).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # now the old set
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(old, final)
        raise
    shutil.rmtree(old)
