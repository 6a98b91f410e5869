"""FAD, KLD and CLAP of generated clips against an eval set: per-clip evidence, then the set's numbers.

Scoring has two halves so that it can run anywhere:
- `ClipScorer` (holds CLAP, PaSST and, for `fad_embedder: vggish`, VGGish) turns a batch of clips into per-clip
  evidence: CLAP cosines to the captions, PaSST label distributions, FAD embedding frames. It is a plain callable
  over a dict of arrays, so the same class runs in-process (training's periodic evaluation) and as a Ray Data
  actor pool (`simba-ttm evaluate`, `ClipScorer` instances spread over GPUs by `eval.gpus_per_actor`).
- `set_metrics` reduces the evidence of all clips to the numbers: mean CLAP cosine, mean KL over paired
  segments (both directions), and the Fréchet distance between all generated and all reference frames.
The reference half of the evidence does not depend on the checkpoint: compute it once per eval set
(`Evidence` of the references) and reuse it for every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from configs.schema import EvalConfig
from eval.clap import Clap, clap_source, cosines
from eval.fad import Vggish, fad_embedder, frechet_distance, vggish_file
from eval.kld import Passt, kld, passt_file

METRIC_KEYS = ("eval/fad", "eval/kld", "eval/kld_reverse", "eval/clap")


@dataclass
class Evidence:
    """Per-clip results of one set of clips (generated, or the references), in eval-set order."""

    probs: np.ndarray  # (N, segments, 527) PaSST label distributions
    frames: np.ndarray  # (N, frames, D) FAD embedding frames (VGGish: 19 per 10 s; CLAP: 1)
    clap: np.ndarray | None = None  # (N,) cosine to the caption (generated clips only)

    @staticmethod
    def concat(parts: list[Evidence]) -> Evidence:
        clap = [p.clap for p in parts]
        return Evidence(
            probs=np.concatenate([p.probs for p in parts]),
            frames=np.concatenate([p.frames for p in parts]),
            clap=None if any(c is None for c in clap) else np.concatenate(clap),
        )

    def take(self, rows: np.ndarray) -> Evidence:
        return Evidence(self.probs[rows], self.frames[rows], None if self.clap is None else self.clap[rows])


def check_weights(e: EvalConfig) -> None:
    """Fail at once, naming the setting, when the CLAP, PaSST (or VGGish) weights a `ClipScorer` needs are missing.
    Resolves the files only: the scorers load the models where they run (Ray actors, perhaps on other machines)."""
    clap_source(e.clap, "eval.clap")
    passt_file(e.passt, "eval.passt")
    if e.fad_embedder == "vggish":
        vggish_file(e.vggish, "eval.vggish")


class ClipScorer:
    """CLAP, PaSST (and VGGish) on one device: clips -> `Evidence` columns.

    Args:
        eval_cfg: the `eval` config section (a dict, as Ray Data passes constructor arguments).
        device: where the models run.
    """

    def __init__(self, eval_cfg: dict | EvalConfig, device: str = "cpu"):
        e = eval_cfg if isinstance(eval_cfg, EvalConfig) else EvalConfig(**eval_cfg)
        self.cfg = e
        self.clap = Clap(e.clap, device, setting="eval.clap")
        self.passt = Passt(e.passt, device, setting="eval.passt")
        self.vggish = Vggish(e.vggish, device, setting="eval.vggish") if e.fad_embedder == "vggish" else None
        self.embed = fad_embedder(e.fad_embedder, vggish=self.vggish, clap=self.clap, batch_size=e.batch_size)

    def evidence(self, audio: np.ndarray, sample_rate: int, captions: list[str] | None = None) -> Evidence:
        """Evidence of clips (B, T) at `sample_rate`, all cut to `eval.seconds`; with `captions`, CLAP cosines too."""
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32))[:, : int(round(self.cfg.seconds * sample_rate))]
        bs = self.cfg.batch_size
        probs = self.passt.label_probs(x, sample_rate, bs).numpy()  # (B, segments, 527)
        frames = self.embed(x, sample_rate).numpy()  # (B * per_clip, D): equal-length clips, equal frame counts
        if len(frames) % len(x):
            raise ValueError(f"{len(frames)} FAD frames do not split evenly over {len(x)} clips of equal length")
        frames = frames.reshape(len(x), len(frames) // len(x), -1)
        clap = None
        if captions is not None:
            if self.cfg.fad_embedder == "clap":  # the CLAP audio embeddings are the FAD frames: reuse them
                audio_emb = torch.from_numpy(frames[:, 0])
            else:
                audio_emb = self.clap.embed_audio(x, sample_rate, bs)
            clap = cosines(audio_emb, self.clap.embed_text(list(captions), bs)).numpy()
        return Evidence(probs, frames, clap)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data: {"group", "index", "audio" (B, T), "sample_rate" (B,), "caption" (B,)} -> evidence columns."""
        ev = self.evidence(batch["audio"], int(batch["sample_rate"][0]), [str(c) for c in batch["caption"]])
        return {
            "group": batch["group"],
            "index": batch["index"],
            "probs": ev.probs,
            "frames": ev.frames,
            "clap": ev.clap,
        }


def set_metrics(generated: Evidence, reference: Evidence) -> dict[str, float]:
    """The eval set's numbers from paired evidence (row i of `generated` from row i's caption), and the references'
    CLAP score when their evidence has it."""
    if generated.clap is None:
        raise ValueError("the generated clips' evidence has no CLAP cosines (score them with their captions)")
    k = kld(torch.from_numpy(reference.probs), torch.from_numpy(generated.probs))
    fad = frechet_distance(
        generated.frames.reshape(-1, generated.frames.shape[-1]),
        reference.frames.reshape(-1, reference.frames.shape[-1]),
    )
    metrics = {
        "eval/fad": float(fad),
        "eval/kld": k.kld,
        "eval/kld_reverse": k.kld_reverse,
        "eval/clap": float(np.mean(generated.clap)),
    }
    if reference.clap is not None:  # the references' own CLAP score: the ceiling the generations are read against
        metrics["eval/clap_reference"] = float(np.mean(reference.clap))
    return metrics


def evidence_in_process(
    scorer: ClipScorer, audio: np.ndarray, sample_rate: int, captions: list[str] | None = None, batch_size: int = 8
) -> Evidence:
    """`scorer` over clips (N, T) in batches, in this process."""
    parts = []
    for start in range(0, len(audio), batch_size):
        caps = None if captions is None else captions[start : start + batch_size]
        parts.append(scorer.evidence(audio[start : start + batch_size], sample_rate, caps))
    return Evidence.concat(parts)


def evidence_on_ray(
    eval_cfg: EvalConfig,
    sets: list[np.ndarray],
    sample_rate: int,
    captions: list[str],
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
) -> list[Evidence]:
    """The evidence of several sets of clips (each (N, T), clip i of every set scored against captions[i]) from one
    Ray Data actor pool of `ClipScorer`s: the models load once per actor for all sets."""
    import ray.data

    n = int(round(eval_cfg.seconds * sample_rate))  # every row one length: a batch may mix sets
    rows = [
        {
            "group": g,
            "index": i,
            "audio": np.asarray(a[:n], dtype=np.float32),
            "sample_rate": sample_rate,
            "caption": captions[i],
        }
        for g, audio in enumerate(sets)
        for i, a in enumerate(audio)
    ]
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    ds = ray.data.from_items(rows).map_batches(
        ClipScorer,
        fn_constructor_kwargs={"eval_cfg": dataclasses.asdict(eval_cfg), "device": device},
        batch_size=eval_cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=1,
    )
    out = {"group": [], "index": [], "probs": [], "frames": [], "clap": []}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in out:
            out[key].append(batch[key])
    cols = {key: np.concatenate(v) for key, v in out.items()}
    result = []
    for g in range(len(sets)):  # actors finish in any order
        mine = np.flatnonzero(cols["group"] == g)
        rows_in_order = mine[np.argsort(cols["index"][mine])]
        result.append(
            Evidence(cols["probs"][rows_in_order], cols["frames"][rows_in_order], cols["clap"][rows_in_order])
        )
    return result
