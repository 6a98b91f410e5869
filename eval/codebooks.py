"""The paper's Fig. 1: how much of the music survives when DAC decodes only its first k of 9 codebooks.

For k = 1..9, every reference clip of the eval set is decoded from the first k codebooks of its stored DAC codes
(`modeling.pretrained.codec.decode_codes`) and cut to `eval.seconds`. Two numbers per k:

- FAD of the reconstructions against the original references (`eval.fad`, embedder `eval.fad_embedder`): what
  the codec loses. Each distinct reference clip counts once: captions of one track share their clip, and
  counting it twice on both sides would only reweight the Gaussians.
- CLAP score of the reconstructions against their captions (`eval.clap`), one pair per caption: how much of what
  the caption describes is still there. The CLAP score of the original references is the ceiling, drawn as a line.

It is `clap_score`'s formula (mean cosine of the projected audio and text embeddings), with each distinct clip
embedded once per k and the captions once in all; with `eval.fad_embedder: clap` the same audio embeddings serve
the FAD too. A clip's embedding does not depend on its batch neighbours (tests/eval/test_clap.py), so this equals
scoring every (clip, caption) pair on its own.

Cost and scale: per k, one DAC decode and one embedding pass per distinct clip, batched by `eval.batch_size`;
only embeddings are kept, so memory does not grow with the set. On the Song Describer set (~700 tracks, ~1,100
captions, 10 s) that is ~6,300 decodes of 10 s clips and as many CLAP (+ VGGish) forwards: minutes on one GPU,
hours on a CPU. It runs in one process because it is that cheap; at a larger scale the (k, batch) pairs are
independent and would become a Ray Data `map_batches` over (k, clip) rows with DAC and the embedders as actor
pools, as `simba-ttm evaluate` scores clips (`eval.scoring.evidence_on_ray`, whose `ClipScorer` also loads PaSST,
which Fig. 1 does not need), reduced to per-k embedding sets on the driver.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.clap import Clap, cosines
from eval.fad import fad_embedder as make_fad_embedder
from eval.fad import frechet_distance
from modeling.pretrained.codec import decode_codes
from pipelines.preprocess.evalset import EvalSet

N_CODEBOOKS = 9
CSV_COLUMNS = ("k", "fad", "clap", "clap_reference")
TINY_PARAMS = 5_000_000  # the tiny random stand-ins have < 1M parameters; the real DAC 76M, CLAP ~190M


@dataclass
class CodebooksResult:
    """Fig. 1's numbers: FAD and CLAP score of the reconstructions from the first k codebooks, k = ks[i]."""

    ks: list[int]
    fad: list[float]  # reconstruction vs original references, per k (lower is better)
    clap: list[float]  # reconstruction vs caption, per k (higher is better)
    clap_reference: float  # the original references vs their captions
    n_captions: int
    n_clips: int  # distinct reference clips
    seconds: float
    fad_embedder: str
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, float]]:
        """One row per k, as the CSV holds them."""
        return [
            dict(k=k, fad=f, clap=c, clap_reference=self.clap_reference)
            for k, f, c in zip(self.ks, self.fad, self.clap, strict=True)
        ]

    def table(self) -> str:
        lines = [f"{'k':>2}  {'FAD (' + self.fad_embedder + ')':>14}  {'CLAP':>8}"]
        lines += [f"{r['k']:>2}  {r['fad']:>14.4f}  {r['clap']:>8.4f}" for r in self.rows()]
        lines.append(f"{'original references':>26}  {self.clap_reference:>8.4f}")
        return "\n".join(lines)


def distinct_clips(evalset: EvalSet) -> tuple[list[int], np.ndarray]:
    """The first row of each track (its reference clip and codes), and for every row the position of its clip.

    Returns:
        (rows, clip_of_row): rows of distinct clips in set order; clip_of_row (N,) indexes into `rows`.
    """
    clip_of_track: dict[str, int] = {}
    rows = []
    for i, track in enumerate(evalset.track_ids):
        if track not in clip_of_track:
            clip_of_track[track] = len(rows)
            rows.append(i)
    return rows, np.array([clip_of_track[track] for track in evalset.track_ids], dtype=np.int64)


def looks_tiny(*models: torch.nn.Module) -> bool:
    """True when any model is one of the tiny random stand-ins (modeling/pretrained/tiny.py, eval/tiny.py)."""
    return any(sum(p.numel() for p in m.parameters()) < TINY_PARAMS for m in models)


def codebook_sweep(
    evalset: EvalSet,
    codec,
    clap: Clap,
    *,
    fad_embedder: str,
    vggish=None,
    seconds: float,
    batch_size: int = 8,
    ks: Sequence[int] = range(1, N_CODEBOOKS + 1),
    progress: Callable[[str], None] | None = None,
) -> CodebooksResult:
    """FAD and CLAP score of the eval set's references decoded from their first k codebooks, for each k in `ks`.

    Args:
        evalset: references (N, T) at the codec's sample rate with their (9, F) DAC codes and captions.
        codec: the DAC model the codes were made with.
        clap: the CLAP model of the CLAP score.
        fad_embedder: FAD's embeddings (`eval.fad_embedder`): "vggish" (then `vggish` is the loaded `Vggish`) or
            "clap", which reuses the CLAP score's audio embeddings.
        seconds: compare the first `seconds` of each clip (`eval.seconds`).
        batch_size: clips per decode and per embedding pass.
    """
    if len(evalset) == 0:
        raise ValueError("the eval set is empty")
    sr = int(codec.sample_rate)
    if evalset.sample_rate != sr:
        raise ValueError(f"the eval set's references are at {evalset.sample_rate} Hz but the codec runs at {sr} Hz")
    n_samples = min(int(round(seconds * sr)), evalset.audio.shape[1])
    rows, clip_of_row = distinct_clips(evalset)
    if fad_embedder == "clap" and len(rows) < 2:
        raise ValueError(
            f"FAD on CLAP embeddings (one per clip) needs at least 2 distinct reference clips; this eval set has "
            f"{len(rows)}: raise eval.limit (--limit) or use eval.fad_embedder=vggish"
        )
    fad_embed = make_fad_embedder(fad_embedder, vggish=vggish, clap=clap)
    references = torch.from_numpy(evalset.audio[rows, :n_samples])  # (C, T)
    codes = np.stack([evalset.codes[i] for i in rows])  # (C, 9, F)
    say = progress or (lambda _msg: None)

    def embed(audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(FAD embeddings, CLAP audio embeddings) of (C, T) clips, one batch at a time."""
        fad_emb, clap_emb = [], []
        for chunk in torch.split(audio, batch_size):
            clap_emb.append(clap.embed_audio(chunk, sr))
            fad_emb.append(clap_emb[-1] if fad_embedder == "clap" else fad_embed(chunk, sr))
        return torch.cat(fad_emb), torch.cat(clap_emb)

    text_emb = clap.embed_text(evalset.captions, batch_size)  # (N, D)
    ref_fad_emb, ref_clap_emb = embed(references)
    clap_reference = float(cosines(ref_clap_emb[clip_of_row], text_emb).mean())
    fads, claps = [], []
    for k in ks:
        decoded = [
            torch.from_numpy(decode_codes(codec, codes[start : start + batch_size], n_codebooks=k)[:, :n_samples])
            for start in range(0, len(codes), batch_size)
        ]
        fad_emb, clap_emb = embed(torch.cat(decoded))
        fads.append(frechet_distance(fad_emb, ref_fad_emb))
        claps.append(float(cosines(clap_emb[clip_of_row], text_emb).mean()))
        say(f"k={k}: FAD {fads[-1]:.4f}, CLAP {claps[-1]:.4f}")
    return CodebooksResult(
        ks=[int(k) for k in ks],
        fad=fads,
        clap=claps,
        clap_reference=clap_reference,
        n_captions=len(evalset),
        n_clips=len(rows),
        seconds=n_samples / sr,
        fad_embedder=fad_embedder,
    )


def write_csv(result: CodebooksResult, path: str | Path) -> Path:
    """The plotted points: one row per k (k, fad, clap, clap_reference), values as Python's repr writes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows())
    return path


def log_to_mlflow(
    result: CodebooksResult, uri: str, experiment_id: str, files: Sequence[str | Path], params: dict[str, object]
) -> str:
    """A new run tagged `simba_ttm.kind=codebooks`: `codebooks/fad` and `codebooks/clap` at step k, the reference
    CLAP score as `codebooks/clap_reference`, `params`, and `files` as artifacts. Returns its run id."""
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id, run_name="codebooks", tags={"simba_ttm.kind": "codebooks"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("codebooks/fad", v, now, k) for k, v in zip(result.ks, result.fad, strict=True)]
    metrics += [Metric("codebooks/clap", v, now, k) for k, v in zip(result.ks, result.clap, strict=True)]
    metrics.append(Metric("codebooks/clap_reference", result.clap_reference, now, 0))
    all_params = {
        "n_captions": result.n_captions,
        "n_clips": result.n_clips,
        "seconds": result.seconds,
        "fad_embedder": result.fad_embedder,
        **params,
    }
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in all_params.items()])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id)
    return run_id
